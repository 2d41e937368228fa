//! What a network configuration may decide. The `ipam` object of a NetworkAttachmentDefinition
//! is written by namespace users and run as root, so the paths root opens, the endpoints it
//! connects to and the credentials it sends come from the admin's flat file, or from the
//! network configuration only where the flat file allows it.

use std::path::{Component, Path, PathBuf};

use serde_json::{Map, Value};

use super::error::ConfigError;
use super::load::named_engine;
use super::raw::{field, is_unset, text};
use crate::files::shown;

/// Names the flat file in place of the default locations (set by the runtime's environment,
/// which a network configuration cannot touch).
pub const FLAT_FILE_ENV: &str = "WHEREABOUTS_FLAT_FILE";

/// The installer's folders. Upstream's documentation puts `configuration_path` and
/// `kubernetes.kubeconfig` inside them into network configurations, so a network configuration
/// may always name those two (read-only) files there.
pub const INSTALLER_DIRS: [&str; 3] = [
    "/etc/cni/net.d/whereabouts.d",
    "/etc/kubernetes/cni/net.d/whereabouts.d",
    "/host/etc/cni/net.d/whereabouts.d",
];

/// The etcd settings that authenticate: they are only sent to an endpoint of the same source.
const ETCD_CREDENTIALS: [&str; 4] = [
    "etcd_username",
    "etcd_password",
    "etcd_cert_file",
    "etcd_key_file",
];

/// Path keys a network configuration may set only inside `allow_inline_paths`.
const PATH_KEYS: [&str; 4] = [
    "local_path",
    "etcd_cert_file",
    "etcd_key_file",
    "etcd_ca_cert_file",
];

/// What the admin's flat file allows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trust {
    /// `allow_inline_paths`: folders in which a network configuration may name the files the
    /// plugin reads and writes (`local_path`, `log_file`, `kubernetes.kubeconfig`,
    /// `configuration_path`, the etcd TLS files).
    pub inline_paths: Vec<PathBuf>,
    /// `allow_inline_endpoints`: a network configuration may name its own etcd endpoints
    /// (with its own credentials only).
    pub inline_endpoints: bool,
    /// `allow_insecure_tls`: kubeconfigs with `insecure-skip-tls-verify`, and credentials over
    /// plain `http://`.
    pub insecure_tls: bool,
}

impl Trust {
    /// The operator's own commands: everything they are given is theirs.
    pub fn operator() -> Trust {
        Trust {
            inline_paths: vec![PathBuf::from("/")],
            inline_endpoints: true,
            insecure_tls: true,
        }
    }

    /// The trust keys of the (lower-cased) flat file.
    pub fn from_flat_file(flat: &Map<String, Value>) -> Result<Trust, ConfigError> {
        let inline_paths: Vec<String> =
            field(flat, "allow_inline_paths", "flat file allow_inline_paths")?.unwrap_or_default();
        if let Some(at) = inline_paths
            .iter()
            .position(|dir| !Path::new(dir).is_absolute())
        {
            return Err(invalid(format!(
                "invalid flat file allow_inline_paths: entry {at} is not an absolute path"
            )));
        }
        let flag = |key: &str| -> Result<bool, ConfigError> {
            Ok(field(flat, key, &format!("flat file {key}"))?.unwrap_or(false))
        };
        Ok(Trust {
            inline_paths: inline_paths.into_iter().map(PathBuf::from).collect(),
            inline_endpoints: flag("allow_inline_endpoints")?,
            insecure_tls: flag("allow_insecure_tls")?,
        })
    }

    /// Whether a network configuration may name `path`.
    pub fn allows_path(&self, path: &Path) -> bool {
        is_inside(path, &self.inline_paths)
    }

    /// As [`Trust::allows_path`], also accepting the installer's folders (for the files
    /// upstream's network configurations name there).
    pub fn allows_installer_file(&self, path: &Path) -> bool {
        self.allows_path(path) || in_installer_dirs(path)
    }
}

/// Whether `path` lies in one of the installer's folders.
fn in_installer_dirs(path: &Path) -> bool {
    let installer: Vec<PathBuf> = INSTALLER_DIRS.iter().map(PathBuf::from).collect();
    is_inside(path, &installer)
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::invalid(msg)
}

/// The longest path and file name the kernel opens (`PATH_MAX`, `NAME_MAX`). Longer ones
/// are refused before they are resolved: resolving walks up the path one folder at a time,
/// which for a path of a megabyte would cost every call seconds of root's time.
const PATH_MAX: usize = 4096;
const NAME_MAX: usize = 255;

/// Whether absolute `path` (without `..`) lies inside one of `dirs`, symbolic links in its
/// folders resolved.
pub fn is_inside(path: &Path, dirs: &[PathBuf]) -> bool {
    let too_long = path.as_os_str().len() >= PATH_MAX
        || path.components().any(|c| c.as_os_str().len() > NAME_MAX);
    if too_long || !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
        return false;
    }
    let resolved = match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => resolve_existing(parent).map(|p| p.join(name)),
        _ => resolve_existing(path),
    };
    let Some(resolved) = resolved else {
        return false;
    };
    dirs.iter().any(|dir| {
        dir.is_absolute() && resolve_existing(dir).is_some_and(|dir| resolved.starts_with(dir))
    })
}

/// The canonical form of the longest existing ancestor, then the rest as written; None when
/// that ancestor is not the very folder its canonical form names. Links are resolved by their
/// text, and a magic link's text is not where the kernel goes: `/proc/<pid>/root` reads `/`
/// from any mount namespace, so `/proc/<pid>/root/etc/cni/net.d/whereabouts.d` would pass
/// for the host's folder while an open reaches the container's.
fn resolve_existing(path: &Path) -> Option<PathBuf> {
    let mut existing = path;
    let mut rest = Vec::new();
    loop {
        if let Ok(canonical) = std::fs::canonicalize(existing) {
            if !same_file(existing, &canonical) {
                return None;
            }
            return Some(
                rest.iter()
                    .rev()
                    .fold(canonical, |out, name| out.join(name)),
            );
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name);
                existing = parent;
            }
            _ => return Some(path.to_path_buf()),
        }
    }
}

/// Whether both paths reach the same file (device and inode), links followed.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

fn refused(key: &str, value: &str) -> ConfigError {
    invalid(format!(
        "ipam.{key} {:?} is not allowed in a network configuration: set it in the flat file, \
         or list its folder in the flat file's allow_inline_paths",
        shown(value)
    ))
}

/// What screening a network configuration found.
#[derive(Debug, Default)]
pub struct Screened {
    /// What was ignored, to log.
    pub warnings: Vec<String>,
    /// It names a store of its own ([`crate::config::IpamConfig::own_store`]).
    pub own_store: bool,
}

/// Takes out of the (lower-cased) inline object what it may not decide, and out of the flat
/// file the credentials that must not follow the inline endpoint. Errors for what cannot be
/// ignored safely; warnings (to log) for what was ignored.
pub fn screen(
    inline: &mut Map<String, Value>,
    flat: &mut Map<String, Value>,
    trust: &Trust,
) -> Result<Screened, ConfigError> {
    let mut warnings = Vec::new();
    let admins_engine = admins_engine(flat)?;
    if let Some(engine) = &admins_engine {
        set_aside_other_engines(inline, engine, &mut warnings);
    }
    if inline
        .remove("sleep_for_race")
        .is_some_and(|v| !is_unset(&v))
    {
        warnings.push(
            "ipam.sleep_for_race in a network configuration is ignored: it is a test hook of the flat file"
                .to_string(),
        );
    }
    if inline.remove("agent_socket").is_some_and(|v| !is_unset(&v)) {
        warnings.push(
            "ipam.agent_socket in a network configuration is ignored: the agent's socket is the flat file's"
                .to_string(),
        );
    }
    screen_log_file(inline, flat, trust, &mut warnings)?;
    for key in PATH_KEYS {
        if let Some(value) = inline_only(inline, flat, key)? {
            if !trust.allows_path(Path::new(&value)) {
                return Err(refused(key, &value));
            }
        }
    }
    let own_kubeconfig = screen_kubeconfig(inline, flat, trust)?;
    let own_endpoint = screen_etcd(inline, flat, trust)?;
    // Only the engine in use counts: an etcd_host left in the flat file of a Kubernetes node
    // (the installer keeps the admin's keys) says nothing about the store.
    let own_store = match admins_engine.as_deref() {
        Some("kubernetes") => own_kubeconfig,
        Some("etcd") => own_endpoint,
        _ => false,
    };
    Ok(Screened {
        warnings,
        own_store,
    })
}

/// The inline value of `key` when it is set and differs from the flat file's. Compared as
/// written: the value is used as written, so the admin's path with a space added is another
/// (relative) path.
fn inline_only(
    inline: &Map<String, Value>,
    flat: &Map<String, Value>,
    key: &str,
) -> Result<Option<String>, ConfigError> {
    let path = format!("ipam.{key}");
    let value = text(inline, key, &path)?;
    let admin = text(flat, key, &format!("flat file {key}")).ok().flatten();
    Ok(value.filter(|v| Some(v) != admin.as_ref()))
}

fn screen_log_file(
    inline: &mut Map<String, Value>,
    flat: &Map<String, Value>,
    trust: &Trust,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    if let Some(value) = inline_only(inline, flat, "log_file")? {
        if !trust.allows_path(Path::new(&value)) {
            inline.remove("log_file");
            warnings.push(format!(
                "ipam.log_file {:?} in a network configuration is ignored: it is outside the flat file's allow_inline_paths",
                shown(&value)
            ));
        }
    }
    Ok(())
}

/// Whether the network configuration names a kubeconfig of its own: another than the flat
/// file's, outside the installer's folders (a file there is the installer's, as upstream's
/// NADs name it). Where the flat file names none, the network configuration's is the node's.
fn screen_kubeconfig(
    inline: &Map<String, Value>,
    flat: &Map<String, Value>,
    trust: &Trust,
) -> Result<bool, ConfigError> {
    let (Some(Value::Object(inner)), admin) = (inline.get("kubernetes"), flat.get("kubernetes"))
    else {
        return Ok(false);
    };
    let empty = Map::new();
    let admin = admin.and_then(Value::as_object).unwrap_or(&empty);
    let Some(value) = inline_only(inner, admin, "kubeconfig")? else {
        return Ok(false);
    };
    // Resolved once: the installer's folders decide both whether it may be named and whose it is.
    let installers = in_installer_dirs(Path::new(&value));
    if !installers && !trust.allows_path(Path::new(&value)) {
        return Err(refused("kubernetes.kubeconfig", &value));
    }
    let admins = text(admin, "kubeconfig", "flat file kubernetes.kubeconfig")
        .ok()
        .flatten();
    Ok(admins.is_some() && !installers)
}

/// The engine the flat file names or implies (a kubeconfig, an etcd endpoint), lower-cased;
/// None when it says nothing of it.
fn admins_engine(flat: &Map<String, Value>) -> Result<Option<String>, ConfigError> {
    let admins = named_engine(flat, "flat file ")?;
    if admins
        .as_deref()
        .is_some_and(|engine| !ENGINES.contains(&engine))
    {
        return Err(invalid(
            "invalid flat file datastore: expected \"local\", \"kubernetes\" or \"etcd\"",
        ));
    }
    Ok(admins)
}

/// The admin's engine stands: a network configuration's `datastore` naming another, and its
/// settings of the engines not in use, are taken out with a warning. Go's plugin, with one
/// engine, ignores them, and NetworkAttachmentDefinitions written for its etcd days still
/// carry them: refusing them would fail the DELs of the pods it served. Another engine would
/// keep this network's addresses apart from the other nodes' (the local engine: one store per
/// node), so it is never taken; the keys are never screened, opened or dialled either. What is
/// left, merged with the flat file, selects the admin's engine (a `datastore` that is not text
/// is refused when the configuration is resolved, as Go's decoder refuses it).
fn set_aside_other_engines(
    inline: &mut Map<String, Value>,
    admins: &str,
    warnings: &mut Vec<String>,
) {
    let mut ignored = Vec::new();
    let named = text(inline, "datastore", "ipam.datastore").ok().flatten();
    if named.is_some_and(|named| named.trim().to_ascii_lowercase() != admins) {
        inline.remove("datastore");
        ignored.push("datastore".to_string());
    }
    for (engine, keys) in ENGINE_KEYS {
        if engine == admins {
            continue;
        }
        for key in keys {
            if inline.remove(*key).is_some_and(|v| !is_unset(&v)) {
                ignored.push(key.to_string());
            }
        }
    }
    if admins != "kubernetes" {
        let kubernetes = inline.get_mut("kubernetes").and_then(Value::as_object_mut);
        if kubernetes
            .and_then(|k| k.remove("kubeconfig"))
            .is_some_and(|v| !is_unset(&v))
        {
            ignored.push("kubernetes.kubeconfig".to_string());
        }
    }
    if !ignored.is_empty() {
        warnings.push(format!(
            "ipam.{} in a network configuration ignored: the flat file's {admins:?} engine \
             serves every network on this node",
            ignored.join(", ipam.")
        ));
    }
}

/// The settings of each engine (besides `kubernetes.kubeconfig`) that a network configuration
/// of another engine's node carries unused.
const ENGINE_KEYS: [(&str, &[&str]); 2] = [
    ("local", &["local_path"]),
    (
        "etcd",
        &[
            "etcd_host",
            "etcd_username",
            "etcd_password",
            "etcd_cert_file",
            "etcd_key_file",
            "etcd_ca_cert_file",
        ],
    ),
];

/// The engines a `datastore` may name.
const ENGINES: [&str; 3] = ["local", "kubernetes", "etcd"];

/// Credentials stay with the endpoint of their source. Returns whether the network
/// configuration names an etcd endpoint of its own: another than the flat file's (where the
/// flat file names none, the network configuration's is the node's).
fn screen_etcd(
    inline: &Map<String, Value>,
    flat: &mut Map<String, Value>,
    trust: &Trust,
) -> Result<bool, ConfigError> {
    let admins = text(flat, "etcd_host", "flat file etcd_host")?.is_some();
    if let Some(host) = inline_only(inline, flat, "etcd_host")? {
        if !trust.inline_endpoints {
            return Err(invalid(format!(
                "ipam.etcd_host {:?} is not allowed in a network configuration: set it in the flat file (or allow_inline_endpoints there)",
                shown(&host)
            )));
        }
        for key in ETCD_CREDENTIALS {
            if names_admins_credential(inline, flat, key) {
                return Err(invalid(format!(
                    "ipam.{key} in a network configuration names the flat file's credential, \
                     which is not sent to the network configuration's own etcd_host"
                )));
            }
            flat.remove(key);
        }
        return Ok(admins);
    }
    if !admins {
        return Ok(false);
    }
    for key in ETCD_CREDENTIALS {
        if inline.get(key).is_some_and(|v| !is_unset(v)) && inline.get(key) != flat.get(key) {
            return Err(invalid(format!(
                "ipam.{key} in a network configuration is not used with the flat file's etcd_host: credentials come from the endpoint's source"
            )));
        }
    }
    Ok(false)
}

/// Whether the inline `key` is one of the flat file's TLS files: the same path, or one that
/// reaches the same file (which `inline_only` lets through as the admin's own value, and
/// another spelling of its folder as an allowed path). Their content is what the network
/// configuration's author does not know; a user name or password written inline is known to
/// whoever wrote it, whoever else uses it too (etcd's own superuser is `root` everywhere).
fn names_admins_credential(
    inline: &Map<String, Value>,
    flat: &Map<String, Value>,
    key: &str,
) -> bool {
    if !key.ends_with("_file") {
        return false;
    }
    let (Some(ours), Some(admins)) = (inline.get(key), flat.get(key)) else {
        return false;
    };
    match (ours.as_str(), admins.as_str()) {
        (Some(a), Some(b)) if !is_unset(ours) && !is_unset(admins) => {
            a == b || same_file(Path::new(a), Path::new(b))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inside_resolves_symlinked_folders_and_refuses_dot_dot() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = dir.path().join("allowed");
        std::fs::create_dir(&allowed).unwrap();
        let dirs = [allowed.clone()];
        assert!(is_inside(&allowed.join("a.db"), &dirs));
        assert!(is_inside(&allowed.join("new/a.db"), &dirs));
        assert!(!is_inside(&allowed.join("../a.db"), &dirs));
        assert!(!is_inside(Path::new("relative/a.db"), &dirs));
        assert!(!is_inside(&dir.path().join("a.db"), &dirs));
        std::os::unix::fs::symlink(dir.path(), allowed.join("out")).unwrap();
        assert!(!is_inside(&allowed.join("out/a.db"), &dirs));
    }

    #[test]
    fn paths_longer_than_the_kernel_opens_are_outside() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = [dir.path().to_path_buf()];
        let deep = dir.path().join("a/".repeat(PATH_MAX / 2));
        assert!(!is_inside(&deep, &dirs));
        assert!(!is_inside(
            &dir.path().join("n".repeat(NAME_MAX + 1)),
            &dirs
        ));
        assert!(is_inside(&dir.path().join("n".repeat(NAME_MAX)), &dirs));
    }
}
