//! Atomic file replacement: a reader (the plugin, the kubelet starting the plugin) sees either the
//! old file or the new one, never a half-written one, and a binary that is executing is never
//! opened for writing (Linux refuses that with ETXTBSY; a rename only swaps directory entries, so
//! the running process keeps its old inode).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Replaces `dest` with `contents` and `mode`, unless it already holds exactly that.
/// Returns whether the file changed.
pub fn write_atomic(dest: &Path, contents: &[u8], mode: u32) -> io::Result<bool> {
    if unchanged(dest, mode, |existing| Ok(fs::read(existing)? == contents))? {
        return Ok(false);
    }
    replace_with(dest, mode, |file| file.write_all(contents))?;
    Ok(true)
}

/// Replaces `dest` with a copy of `src` and `mode`, unless it already is one.
/// Returns whether the file changed.
pub fn copy_atomic(src: &Path, dest: &Path, mode: u32) -> io::Result<bool> {
    let same = unchanged(dest, mode, |existing| same_bytes(src, existing))?;
    if same {
        return Ok(false);
    }
    let mut source = File::open(src)?;
    replace_with(dest, mode, |file| io::copy(&mut source, file).map(drop))?;
    Ok(true)
}

/// Whether `dest` is a regular file with `mode` and contents that `same` accepts. A symbolic
/// link is never up to date, whatever it points at: root would go on running, or reading, a
/// file outside the folder that someone else may own, so it is replaced by a file of ours.
fn unchanged(
    dest: &Path,
    mode: u32,
    same: impl FnOnce(&Path) -> io::Result<bool>,
) -> io::Result<bool> {
    let meta = match fs::symlink_metadata(dest) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(err) => return Err(err),
    };
    Ok(meta.is_file() && meta.permissions().mode() & 0o7777 == mode && same(dest)?)
}

/// Compares two files in chunks: binaries are tens of megabytes and the DaemonSet's memory
/// limit is small.
fn same_bytes(a: &Path, b: &Path) -> io::Result<bool> {
    let (mut a, mut b) = (File::open(a)?, File::open(b)?);
    if a.metadata()?.len() != b.metadata()?.len() {
        return Ok(false);
    }
    let (mut buf_a, mut buf_b) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let n = read_full(&mut a, &mut buf_a)?;
        if n != read_full(&mut b, &mut buf_b)? || buf_a[..n] != buf_b[..n] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

/// Fills `buf` unless the file ends first; returns how much was read.
fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(filled)
}

/// Writes a temporary file next to `dest` (same filesystem, so the rename is atomic), flushes it
/// to disk, renames it over `dest` and flushes the directory entry.
fn replace_with(
    dest: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let dir = parent(dest);
    let tmp = temp_path(dest);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The creation mode is filtered by the umask: set it explicitly.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        fill(&mut file)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, dest)?;
        File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        // Best effort: a leftover temporary file is harmless but untidy.
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A hidden, unique name in the same directory. Two installers can write the same host
/// directory at once (old and new pod during a DaemonSet update), and each is pid 1 of its
/// container, so the pid alone would make them share, and corrupt, one temporary file.
fn temp_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    parent(dest).join(format!(".{name}.tmp-{:016x}", rand::random::<u64>()))
}

/// How old a leftover temporary file must be before it is removed: far older than any write
/// takes, so another installer's write in progress (old and new pod during an update) is never
/// cut short.
pub const STALE_TEMP_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// Removes the temporary files of `dest` that an installer killed mid-write left behind (a
/// binary's tens of megabytes, or a kubeconfig holding a token), once older than `age`. Only
/// regular files of the installer's own naming; best effort.
pub fn remove_stale_temps(dest: &Path, age: std::time::Duration) {
    let Some(name) = dest.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = fs::read_dir(parent(dest)) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        // `DirEntry::metadata` does not follow a symbolic link: only regular files go.
        let stale = entry.metadata().is_ok_and(|m| {
            m.is_file()
                && m.modified()
                    .is_ok_and(|t| t.elapsed().is_ok_and(|e| e >= age))
        });
        if stale {
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_old_leftover_temporary_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("whereabouts");
        let left = temp_path(&dest);
        fs::write(&left, "half a binary").unwrap();
        let other = dir.path().join(".other.tmp-1");
        fs::write(&other, "x").unwrap();
        // Young: another installer may be writing it.
        remove_stale_temps(&dest, STALE_TEMP_AGE);
        assert!(left.exists());
        remove_stale_temps(&dest, std::time::Duration::ZERO);
        assert!(!left.exists());
        assert!(other.exists(), "another file's temporary file stays");
    }

    #[test]
    fn writes_then_skips_identical_then_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        assert!(write_atomic(&path, b"one", 0o600).unwrap());
        assert!(!write_atomic(&path, b"one", 0o600).unwrap());
        assert!(write_atomic(&path, b"one", 0o644).unwrap());
        assert!(write_atomic(&path, b"two", 0o644).unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o644);
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_link_to_the_same_content_is_replaced_by_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        fs::write(&elsewhere, b"plugin").unwrap();
        fs::set_permissions(&elsewhere, fs::Permissions::from_mode(0o755)).unwrap();
        let dest = dir.path().join("whereabouts");
        std::os::unix::fs::symlink(&elsewhere, &dest).unwrap();
        assert!(copy_atomic(&elsewhere, &dest, 0o755).unwrap());
        assert!(fs::symlink_metadata(&dest).unwrap().file_type().is_file());
        assert_eq!(fs::read(&dest).unwrap(), b"plugin");
        assert_eq!(
            fs::read(&elsewhere).unwrap(),
            b"plugin",
            "the link's target is left"
        );
    }
}
