//! Files a configuration names, opened as root: never through a symbolic link, only regular
//! files, never blocking on a FIFO or device, and read with a size cap.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The most a configuration file (flat file, kubeconfig, certificate) may hold.
pub const MAX_CONFIG_FILE_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{} is a symbolic link: name the file itself", shown_path(.path))]
    Symlink { path: PathBuf },
    #[error("{} is not a regular file", shown_path(.path))]
    NotRegular { path: PathBuf },
    #[error("{} is larger than {cap} bytes", shown_path(.path))]
    TooLarge { path: PathBuf, cap: u64 },
    #[error("{} is this process's standard output or error", shown_path(.path))]
    StandardStream { path: PathBuf },
    #[error("cannot open {}", shown_path(.path))]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {}", shown_path(.path))]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl FileError {
    /// Whether the file does not exist (callers that look in several places go on).
    pub fn is_not_found(&self) -> bool {
        matches!(self, FileError::Open { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }

    /// The message with its cause (the OS error says why without quoting the file).
    pub fn describe(&self) -> String {
        match self {
            FileError::Open { source, .. } | FileError::Read { source, .. } => {
                format!("{self}: {source}")
            }
            other => other.to_string(),
        }
    }
}

/// Flags every open takes: no symlink as the last component, no blocking open of a FIFO.
const SAFE_FLAGS: i32 = libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;

fn opened(path: &Path, result: io::Result<File>) -> Result<File, FileError> {
    let file = result.map_err(|source| match source.raw_os_error() {
        Some(libc::ELOOP) => FileError::Symlink { path: path.into() },
        Some(libc::ENXIO) => FileError::NotRegular { path: path.into() },
        _ => FileError::Open {
            path: path.into(),
            source,
        },
    })?;
    let meta = file.metadata().map_err(|source| FileError::Read {
        path: path.into(),
        source,
    })?;
    if !meta.file_type().is_file() {
        return Err(FileError::NotRegular { path: path.into() });
    }
    Ok(file)
}

/// Reads a whole file of at most `cap` bytes.
pub fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>, FileError> {
    let file = opened(
        path,
        OpenOptions::new()
            .read(true)
            .custom_flags(SAFE_FLAGS)
            .open(path),
    )?;
    let mut bytes = Vec::new();
    file.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| FileError::Read {
            path: path.into(),
            source,
        })?;
    if bytes.len() as u64 > cap {
        return Err(FileError::TooLarge {
            path: path.into(),
            cap,
        });
    }
    Ok(bytes)
}

/// Reads a configuration file of at most [`MAX_CONFIG_FILE_BYTES`].
pub fn read_config_file(path: &Path) -> Result<Vec<u8>, FileError> {
    read_capped(path, MAX_CONFIG_FILE_BYTES)
}

/// Opens (creating, mode 0600) a file to append to: a log. Never stdout or stderr of this
/// process, whatever name reaches them.
pub fn open_append(path: &Path) -> Result<File, FileError> {
    let file = opened(
        path,
        OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(SAFE_FLAGS)
            .open(path),
    )?;
    let meta = file.metadata().map_err(|source| FileError::Read {
        path: path.into(),
        source,
    })?;
    for stream in [
        io::stdout().lock().as_fd_meta(),
        io::stderr().lock().as_fd_meta(),
    ] {
        if stream.is_some_and(|(dev, ino)| dev == meta.dev() && ino == meta.ino()) {
            return Err(FileError::StandardStream { path: path.into() });
        }
    }
    Ok(file)
}

/// The device and inode behind a standard stream, when it is open.
trait FdMeta {
    fn as_fd_meta(&self) -> Option<(u64, u64)>;
}

impl<T: std::os::fd::AsFd> FdMeta for T {
    fn as_fd_meta(&self) -> Option<(u64, u64)> {
        let owned = self.as_fd().try_clone_to_owned().ok()?;
        let meta = File::from(owned).metadata().ok()?;
        Some((meta.dev(), meta.ino()))
    }
}

/// The longest value an error or log line shows; the rest is cut.
pub const SHOWN_CHARS: usize = 120;

/// A value for a message: control characters escaped, cut to [`SHOWN_CHARS`] characters.
pub fn shown(text: &str) -> String {
    shown_within(text, SHOWN_CHARS)
}

/// As [`shown`], cut to `max` characters.
pub fn shown_within(text: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A URL for a message, as [`shown`], without the user information and query it may carry
/// (`https://user:secret@host/?token=...`): an endpoint is the admin's, and a network
/// configuration's author reads the messages.
pub fn shown_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    // Everything up to the last `@`: a password may hold `/`, `?` or `#` unescaped, which
    // would end the authority early (a path's own `@` costs the host in the message, no more).
    let (hidden, rest) = match rest.rsplit_once('@') {
        Some((_, after)) => ("…@", after),
        None => ("", rest),
    };
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    shown(&format!("{scheme}{hidden}{rest}"))
}

/// `text` with its values left out: what it quotes (`"..."`), and every word holding a digit
/// or a path or address separator (addresses, ranges, numbers, paths), field names kept.
pub fn without_values(text: &str) -> String {
    let mut unquoted = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in text.chars() {
        match (quoted, escaped, c) {
            (true, false, '\\') => escaped = true,
            (true, true, _) => escaped = false,
            (_, _, '"') => {
                if !quoted {
                    unquoted.push('…');
                }
                quoted = !quoted;
            }
            (true, false, _) => {}
            (false, _, c) => unquoted.push(c),
        }
    }
    let word = |w: &str| {
        let body = w.trim_end_matches([':', ',', ';', ')']);
        let value = body
            .chars()
            .any(|c| c.is_ascii_digit() || "/.:".contains(c));
        if value && !body.starts_with("ipam.") {
            format!("…{}", &w[body.len()..])
        } else {
            w.to_string()
        }
    };
    // Words are runs of anything but white space: a value after a tab or a line break is one.
    static WORD: std::sync::LazyLock<regex::Regex> =
        std::sync::LazyLock::new(|| regex::Regex::new(r"\S+").expect("a valid pattern"));
    WORD.replace_all(&unquoted, |found: &regex::Captures| word(&found[0]))
        .into_owned()
}

/// A path for a message, as [`shown`].
pub fn shown_path(path: &Path) -> String {
    shown(&path.to_string_lossy())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_left_out_whatever_separates_them() {
        let text = "cannot reach \"etcd.admin\" at 10.1.2.3:2379,\tpath /etc/admin.d\nfield ipam.range: bad";
        assert_eq!(
            without_values(text),
            "cannot reach … at …,\tpath …\nfield ipam.range: bad"
        );
    }

    #[test]
    fn urls_are_shown_without_credentials() {
        assert_eq!(
            shown_url("https://root:s3cret@etcd.admin:2379/v3?token=t#x"),
            "https://…@etcd.admin:2379/v3"
        );
        assert_eq!(shown_url("root:s3cret@etcd:2379"), "…@etcd:2379");
        assert_eq!(
            shown_url("https://10.0.0.1:6443/"),
            "https://10.0.0.1:6443/"
        );
        assert_eq!(shown_url("etcd:2379"), "etcd:2379");
        assert_eq!(
            shown_url("https://root:p?s/s#x@etcd:2379"),
            "https://…@etcd:2379"
        );
        assert_eq!(
            shown_url("https://[fd00::1]:2379"),
            "https://[fd00::1]:2379"
        );
    }

    #[test]
    fn symlinks_fifos_and_big_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::write(&real, "ok").unwrap();
        assert_eq!(read_capped(&real, 2).unwrap(), b"ok");
        assert!(matches!(
            read_capped(&real, 1),
            Err(FileError::TooLarge { .. })
        ));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(matches!(
            read_capped(&link, 10),
            Err(FileError::Symlink { .. })
        ));
        assert!(matches!(open_append(&link), Err(FileError::Symlink { .. })));
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            read_capped(&fifo, 10),
            Err(FileError::NotRegular { .. })
        ));
        assert!(matches!(
            open_append(&fifo),
            Err(FileError::NotRegular { .. })
        ));
        assert!(matches!(
            read_capped(Path::new("/dev/zero"), 10),
            Err(FileError::NotRegular { .. })
        ));
        assert!(read_capped(&dir.path().join("none"), 10)
            .unwrap_err()
            .is_not_found());
    }

    #[test]
    fn shown_escapes_and_cuts() {
        assert_eq!(shown("a\nb\u{1b}"), "a\\nb\\u{1b}");
        assert_eq!(shown(&"x".repeat(500)).chars().count(), SHOWN_CHARS + 1);
    }
}
