//! `whereabouts install`: puts the plugin on a node, from inside the DaemonSet's container.
//!
//! It copies its own binary into the host's CNI bin directory, writes `whereabouts.d/` into the
//! host's CNI configuration directory (the flat file, a kubeconfig built from the pod's service
//! account, the node name) and then, unless `--once`, stays up and rewrites the kubeconfig when
//! the kubelet rotates the token or the CA. Directory and environment variable names are those of
//! upstream's install script, so existing DaemonSet overrides keep working.

mod files;
pub mod kubeconfig;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;

use crate::config;
use crate::config::trust::INSTALLER_DIRS;
use crate::k8s::cluster;

/// The host's `/opt/cni/bin`, as the DaemonSet mounts it.
pub const DEFAULT_CNI_BIN_DIR: &str = "/host/opt/cni/bin";
/// The host's `/etc/cni/net.d`, as the DaemonSet mounts it.
pub const DEFAULT_CNI_CONF_DIR: &str = "/host/etc/cni/net.d";
/// The prefix under which the DaemonSet mounts host directories.
pub const HOST_MOUNT_PREFIX: &str = "/host";
/// Upstream's default schedule of the cluster-wide cleanup.
pub const DEFAULT_RECONCILER_CRON: &str = "30 4 * * *";

/// The directory inside the CNI configuration directory that holds our files.
pub const WHEREABOUTS_D: &str = "whereabouts.d";
pub const BINARY_NAME: &str = "whereabouts";
/// The plugin-only build's file name, next to the full binary in the image (`/whereabouts`).
pub const PLUGIN_BUILD_NAME: &str = "whereabouts-plugin";
pub const FLAT_FILE_NAME: &str = "whereabouts.conf";
pub const KUBECONFIG_NAME: &str = "whereabouts.kubeconfig";
pub const NODENAME_FILE_NAME: &str = "nodename";

/// Modes of what we write. The kubeconfig holds a credential: owner only. The flat file mirrors
/// upstream's 0600; the plugin runs as root.
pub const BINARY_MODE: u32 = 0o755;
pub const KUBECONFIG_MODE: u32 = 0o600;
pub const FLAT_FILE_MODE: u32 = 0o600;
pub const NODENAME_MODE: u32 = 0o644;

/// The flat file's keys the installer sets (or removes, when its settings leave them out).
const INSTALLER_KEYS: [&str; 7] = [
    "datastore",
    "configuration_path",
    "kubernetes",
    "reconciler_cron_expression",
    "log_level",
    "go_whereabouts",
    "agent_socket",
];

/// The flags of `whereabouts install`, boxed so that the CLI's subcommand enum stays small;
/// fields are reached through `Deref` to [`InstallOptions`].
#[derive(clap::Args, Debug, Clone)]
pub struct InstallArgs {
    #[command(flatten)]
    pub options: Box<InstallOptions>,
}

impl std::ops::Deref for InstallArgs {
    type Target = InstallOptions;
    fn deref(&self) -> &InstallOptions {
        &self.options
    }
}

impl std::ops::DerefMut for InstallArgs {
    fn deref_mut(&mut self) -> &mut InstallOptions {
        &mut self.options
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct InstallOptions {
    /// Host CNI bin directory, as mounted in this container.
    #[arg(long, env = "CNI_BIN_DIR", default_value = DEFAULT_CNI_BIN_DIR)]
    pub cni_bin_dir: PathBuf,

    /// Host CNI configuration directory, as mounted in this container.
    #[arg(long, env = "CNI_CONF_DIR", default_value = DEFAULT_CNI_CONF_DIR)]
    pub cni_conf_dir: PathBuf,

    /// The CNI configuration directory as the host sees it: the paths written into the flat file
    /// use it. Default: --cni-conf-dir without its leading /host.
    #[arg(long, env = "HOST_CNI_CONF_DIR")]
    pub host_cni_conf_dir: Option<PathBuf>,

    /// The binary to install. Default: this executable; with `--agent=true`, the plugin-only
    /// build (`whereabouts-plugin`) next to it when there is one, as in the image.
    #[arg(long, env = "CNI_BIN_SRC")]
    pub cni_bin_src: Option<PathBuf>,

    /// Directory holding the pod's service-account `token`, `ca.crt` and `namespace`.
    #[arg(long, env = "SERVICE_ACCOUNT_PATH", default_value = cluster::SERVICE_ACCOUNT_DIR)]
    pub service_account_path: PathBuf,

    /// CA bundle of the API server. Default: `ca.crt` in the service-account directory.
    #[arg(long, env = "KUBE_CA_FILE")]
    pub kube_ca_file: Option<PathBuf>,

    /// API server host (set by the kubelet in every pod).
    #[arg(long, env = "KUBERNETES_SERVICE_HOST")]
    pub kubernetes_service_host: Option<String>,

    /// API server port (set by the kubelet in every pod).
    #[arg(long, env = "KUBERNETES_SERVICE_PORT")]
    pub kubernetes_service_port: Option<String>,

    /// Namespace of the IPPools and reservations, written into the kubeconfig's context.
    /// Default: the service account's namespace, else kube-system.
    #[arg(long, env = "WHEREABOUTS_NAMESPACE")]
    pub namespace: Option<String>,

    /// This node's name as the API server knows it (the DaemonSet sets it from spec.nodeName).
    #[arg(long, env = "NODENAME")]
    pub node_name: Option<String>,

    /// Schedule of the cluster-wide cleanup, written into the flat file.
    #[arg(long, env = "WHEREABOUTS_RECONCILER_CRON", default_value = DEFAULT_RECONCILER_CRON)]
    pub reconciler_cron: String,

    /// Whether Go Whereabouts binaries may still write the pools (auto, present or absent),
    /// written into the flat file as `go_whereabouts`: `present` during a migration from or
    /// back to the Go binary. Default: none written, which the plugin reads as `auto`.
    #[arg(long, env = "WHEREABOUTS_GO_PEERS", value_parser = ["auto", "present", "absent"])]
    pub go_whereabouts: Option<String>,

    /// The plugin's log level written into the flat file (debug, verbose, error or panic).
    /// Default: none written, so the plugin's own default applies.
    #[arg(long, env = "WHEREABOUTS_LOG_LEVEL")]
    pub log_level: Option<String>,

    /// The node agent serves the plugin (`whereabouts agent` in the same pod): the host gets no
    /// kubeconfig (one left by an earlier install is removed), so the agent's root-only socket
    /// is the only way to the store. With `false`, the plugin uses the host kubeconfig.
    #[arg(long, env = "WHEREABOUTS_AGENT", default_value_t = false, action = clap::ArgAction::Set)]
    pub agent: bool,

    /// Install and exit instead of staying up to refresh the kubeconfig.
    #[arg(long)]
    pub once: bool,

    /// How often to check the token and CA for rotation, in milliseconds.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(10..))]
    pub poll_interval_ms: u64,

    /// Write the flat file under a host CNI configuration directory the plugin does not look
    /// in (refused otherwise): for a plugin given its flat file by `WHEREABOUTS_FLAT_FILE`.
    #[arg(long)]
    pub any_conf_dir: bool,
}

/// What can go wrong installing. Each message names the setting or file to fix.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("invalid {0}")]
    Invalid(String),
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> InstallError {
    let path = path.to_path_buf();
    move |source| InstallError::Io {
        action,
        path,
        source,
    }
}

/// The resolved settings: every path and value the installer uses.
#[derive(Debug, Clone)]
pub struct Settings {
    pub binary_source: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub host_cni_conf_dir: PathBuf,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
    /// `https://host:port`.
    pub server: String,
    pub namespace: String,
    pub node_name: String,
    pub reconciler_cron: String,
    pub go_whereabouts: Option<String>,
    pub log_level: Option<String>,
    pub poll_interval: Duration,
    /// The agent serves the plugin: no kubeconfig on the host.
    pub agent: bool,
}

/// The plugin reads its flat file from fixed folders only. Written anywhere else it is never
/// read: the plugin then keeps addresses in a database of its node's own, and nodes hand out
/// each other's addresses.
fn plugin_reads_flat_file_in(host_cni_conf_dir: &Path) -> Result<(), InstallError> {
    let flat_dir = host_cni_conf_dir.join(WHEREABOUTS_D);
    if INSTALLER_DIRS.iter().any(|dir| Path::new(dir) == flat_dir) {
        return Ok(());
    }
    Err(InstallError::Invalid(format!(
        "host CNI configuration directory {} (HOST_CNI_CONF_DIR, the chart's cniConf.confDir): \
         the plugin reads its flat file only from {}, so each node would keep addresses in its \
         own database; mount /etc/cni/net.d (the flat file's folder need not be the one the \
         runtime reads network configurations from), or give --any-conf-dir when the runtime \
         names the flat file to the plugin (WHEREABOUTS_FLAT_FILE)",
        host_cni_conf_dir.display(),
        INSTALLER_DIRS.join(", ")
    )))
}

impl Settings {
    pub fn from_args(args: &InstallArgs) -> Result<Self, InstallError> {
        let binary_source = match &args.cni_bin_src {
            Some(path) => path.clone(),
            None => default_binary(args.agent)?,
        };
        let host_cni_conf_dir = match &args.host_cni_conf_dir {
            Some(dir) => dir.clone(),
            None => strip_host_prefix(&args.cni_conf_dir),
        };
        // The plugin reads these paths from the flat file, whatever its working directory.
        if !host_cni_conf_dir.is_absolute() {
            return Err(InstallError::Invalid(format!(
                "host CNI configuration directory {} (HOST_CNI_CONF_DIR): it must be absolute",
                host_cni_conf_dir.display()
            )));
        }
        if !args.any_conf_dir {
            plugin_reads_flat_file_in(&host_cni_conf_dir)?;
        }
        let server = kubeconfig::server_url(
            args.kubernetes_service_host.as_deref().unwrap_or(""),
            args.kubernetes_service_port.as_deref().unwrap_or("443"),
        )?;
        let namespace =
            cluster::namespace_from(args.namespace.as_deref(), &args.service_account_path);
        let node_name = non_empty(args.node_name.as_deref())
            .ok_or(InstallError::Missing(
                "the node name (NODENAME, set from spec.nodeName, or --node-name)",
            ))?
            .to_string();
        if let Some(level) = &args.log_level {
            if !["debug", "verbose", "error", "panic"].contains(&level.as_str()) {
                return Err(InstallError::Invalid(format!(
                    "log level {level:?} (expected debug, verbose, error or panic)"
                )));
            }
        }
        Ok(Settings {
            binary_source,
            cni_bin_dir: args.cni_bin_dir.clone(),
            cni_conf_dir: args.cni_conf_dir.clone(),
            host_cni_conf_dir,
            token_file: args.service_account_path.join("token"),
            ca_file: args
                .kube_ca_file
                .clone()
                .unwrap_or_else(|| args.service_account_path.join("ca.crt")),
            server,
            namespace,
            node_name,
            reconciler_cron: args.reconciler_cron.clone(),
            go_whereabouts: args.go_whereabouts.clone(),
            log_level: args.log_level.clone(),
            poll_interval: Duration::from_millis(args.poll_interval_ms),
            agent: args.agent,
        })
    }

    /// `whereabouts.d` as mounted in this container.
    pub fn whereabouts_d(&self) -> PathBuf {
        self.cni_conf_dir.join(WHEREABOUTS_D)
    }

    /// `whereabouts.d` as the host (and so the plugin) sees it.
    pub fn host_whereabouts_d(&self) -> PathBuf {
        self.host_cni_conf_dir.join(WHEREABOUTS_D)
    }

    pub fn kubeconfig_path(&self) -> PathBuf {
        self.whereabouts_d().join(KUBECONFIG_NAME)
    }

    /// The flat file over the one found on the node (`existing`): the keys this installer
    /// writes are its own, set or removed by its settings at every start; every other key is
    /// the admin's (`allow_inline_paths` and the other rules only a flat file may set, which no
    /// flag carries) and is kept. A file that is not a JSON object is replaced whole. A file
    /// that selects another engine is refused: this installer sets up the Kubernetes engine,
    /// and switching a node's engine in silence would hand out the other store's addresses
    /// again.
    pub fn flat_file_over(&self, existing: Option<&[u8]>) -> Result<String, InstallError> {
        let ours = self.flat_file();
        let mut merged = match existing.map(serde_json::from_slice::<serde_json::Value>) {
            Some(Ok(serde_json::Value::Object(theirs))) => theirs,
            None => return Ok(ours),
            Some(_) => {
                tracing::warn!("the flat file found is no JSON object: replaced whole");
                return Ok(ours);
            }
        };
        if let Some(key) = another_engine(&merged) {
            return Err(InstallError::Invalid(format!(
                "flat file: its {key} selects another engine than kubernetes, which this \
                 installer sets up; to switch the node, remove the file's datastore and etcd \
                 settings (the other store's addresses are not carried over)"
            )));
        }
        // The plugin reads keys in any case, and folds them as Go does: `Agent_Socket` left
        // behind would still be read, and two keys for one field are refused.
        merged.retain(|key, _| {
            !INSTALLER_KEYS
                .iter()
                .any(|ours| config::same_key(key, ours))
        });
        let Ok(serde_json::Value::Object(ours)) = serde_json::from_str(&ours) else {
            return Ok(ours);
        };
        merged.extend(ours);
        let merged = serde_json::Value::Object(merged);
        let mut text = serde_json::to_string_pretty(&merged).unwrap_or_else(|_| merged.to_string());
        text.push('\n');
        Ok(text)
    }

    /// The flat file's content: upstream's keys, with host paths.
    pub fn flat_file(&self) -> String {
        let host_dir = self.host_whereabouts_d();
        let mut flat = json!({
            "datastore": "kubernetes",
            "configuration_path": host_dir.to_string_lossy(),
            "kubernetes": {"kubeconfig": host_dir.join(KUBECONFIG_NAME).to_string_lossy()},
            "reconciler_cron_expression": self.reconciler_cron,
        });
        if let (Some(level), Some(map)) = (&self.log_level, flat.as_object_mut()) {
            map.insert("log_level".into(), json!(level));
        }
        if let (Some(peers), Some(map)) = (&self.go_whereabouts, flat.as_object_mut()) {
            map.insert("go_whereabouts".into(), json!(peers));
        }
        // The plugin then knows the agent is meant to answer: without it, "try again".
        if let (true, Some(map)) = (self.agent, flat.as_object_mut()) {
            map.insert("agent_socket".into(), json!(crate::agent::DEFAULT_SOCKET));
        }
        // Serialising a Value built from strings cannot fail; fall back to compact just in case.
        let mut text = serde_json::to_string_pretty(&flat).unwrap_or_else(|_| flat.to_string());
        text.push('\n');
        text
    }

    /// The kubeconfig from the current token and CA.
    pub fn kubeconfig(&self) -> Result<String, InstallError> {
        let token = std::fs::read_to_string(&self.token_file).map_err(io_err(
            "cannot read the service-account token",
            &self.token_file,
        ))?;
        let token = token.trim();
        if token.is_empty() {
            return Err(InstallError::Invalid(format!(
                "service-account token {}: the file is empty",
                self.token_file.display()
            )));
        }
        let ca = std::fs::read(&self.ca_file)
            .map_err(io_err("cannot read the cluster CA", &self.ca_file))?;
        kubeconfig::render(&self.server, &ca, token, &self.namespace)
    }
}

fn non_empty(value: Option<&str>) -> Option<&str> {
    value.map(str::trim).filter(|v| !v.is_empty())
}

fn strip_host_prefix(dir: &Path) -> PathBuf {
    match dir.strip_prefix(HOST_MOUNT_PREFIX) {
        Ok(rest) => Path::new("/").join(rest),
        Err(_) => dir.to_path_buf(),
    }
}

/// This executable, or with the agent the plugin-only build next to it when there is one.
/// With the agent, the host holds no credentials, so the cluster engines' clients in the full
/// binary could never run there; the plugin-only build leaves them out and every CNI call
/// starts sooner (`docs/benchmarks.md`). Installed under the same name either way.
fn default_binary(agent: bool) -> Result<PathBuf, InstallError> {
    let this = std::env::current_exe().map_err(io_err(
        "cannot find this executable",
        Path::new("/proc/self/exe"),
    ))?;
    let plugin_build = this.with_file_name(PLUGIN_BUILD_NAME);
    Ok(if agent && plugin_build.is_file() {
        plugin_build
    } else {
        this
    })
}

/// The key by which a flat file selects another engine than the Kubernetes engine, as the
/// plugin reads it: `datastore`, else an `etcd_host` without a `kubernetes.kubeconfig`.
fn another_engine(flat: &serde_json::Map<String, serde_json::Value>) -> Option<&'static str> {
    let engine = config::flat_file_engine(flat)?;
    if engine == "kubernetes" {
        return None;
    }
    let names_datastore = flat.keys().any(|key| config::same_key(key, "datastore"));
    Some(if names_datastore {
        "datastore"
    } else {
        "etcd_host"
    })
}

/// The flat file on the node, to keep the admin's keys of. None when there is none, or when
/// what is there cannot be one (a symbolic link, a device, a file over the size cap), which is
/// replaced. Any other failure to read it stops the start: replacing a file that could not be
/// read would drop the admin's rules for good.
fn found_flat_file(path: &Path) -> Result<Option<Vec<u8>>, InstallError> {
    use crate::files::FileError;
    match crate::files::read_config_file(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(err) if err.is_not_found() => Ok(None),
        Err(
            err @ (FileError::Symlink { .. }
            | FileError::NotRegular { .. }
            | FileError::TooLarge { .. }),
        ) => {
            tracing::warn!(error = %err, "the flat file found is replaced whole");
            Ok(None)
        }
        Err(err) => Err(InstallError::Invalid(format!(
            "cannot read the flat file to keep the admin's keys: {}",
            err.describe()
        ))),
    }
}

/// Writes everything once: binary, flat file, kubeconfig, node name. The binary goes last so
/// that a node never has a plugin binary without its configuration; with the agent, the
/// kubeconfig goes after it, since the binary it replaces (an earlier release, upstream's) may
/// still need it for the calls it serves meanwhile.
pub fn install_once(settings: &Settings) -> Result<(), InstallError> {
    let dir = settings.whereabouts_d();
    std::fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
    let written = [
        dir.join(FLAT_FILE_NAME),
        settings.kubeconfig_path(),
        dir.join(NODENAME_FILE_NAME),
        settings.cni_bin_dir.join(BINARY_NAME),
    ];
    for dest in &written {
        files::remove_stale_temps(dest, files::STALE_TEMP_AGE);
    }

    write_flat_file(settings)?;
    if !settings.agent {
        refresh_kubeconfig(settings)?;
    }

    let nodename = dir.join(NODENAME_FILE_NAME);
    files::write_atomic(
        &nodename,
        format!("{}\n", settings.node_name).as_bytes(),
        NODENAME_MODE,
    )
    .map_err(io_err("cannot write", &nodename))?;

    std::fs::create_dir_all(&settings.cni_bin_dir)
        .map_err(io_err("cannot create", &settings.cni_bin_dir))?;
    let binary = settings.cni_bin_dir.join(BINARY_NAME);
    let changed = files::copy_atomic(&settings.binary_source, &binary, BINARY_MODE)
        .map_err(io_err("cannot install the binary at", &binary))?;
    if settings.agent {
        remove_kubeconfig(settings)?;
    }
    tracing::info!(
        binary = %binary.display(),
        changed,
        dir = %dir.display(),
        "installed whereabouts"
    );
    Ok(())
}

/// Writes the flat file over the one on the node (see [`Settings::flat_file_over`]), when it
/// differs; whether it did.
fn write_flat_file(settings: &Settings) -> Result<bool, InstallError> {
    let flat = settings.whereabouts_d().join(FLAT_FILE_NAME);
    let existing = found_flat_file(&flat)?;
    let content = settings.flat_file_over(existing.as_deref())?;
    files::write_atomic(&flat, content.as_bytes(), FLAT_FILE_MODE)
        .map_err(io_err("cannot write", &flat))
}

/// Writes the flat file again if it is gone. Only then: an installer of another release
/// running beside this one (a rollout with surge) must not have the two rewrite each other's
/// settings at every poll.
fn restore_flat_file(settings: &Settings) {
    let flat = settings.whereabouts_d().join(FLAT_FILE_NAME);
    if std::fs::symlink_metadata(&flat).is_ok() {
        return;
    }
    match write_flat_file(settings) {
        Ok(_) => tracing::warn!(path = %flat.display(), "the flat file was gone: written again"),
        Err(err) => tracing::warn!(error = %err, "cannot write the flat file again; retrying"),
    }
}

/// Rewrites the kubeconfig when it differs from what the current token and CA give (rotation,
/// or someone deleted or edited it). Returns whether it was rewritten.
pub fn refresh_kubeconfig(settings: &Settings) -> Result<bool, InstallError> {
    let path = settings.kubeconfig_path();
    let changed = files::write_atomic(&path, settings.kubeconfig()?.as_bytes(), KUBECONFIG_MODE)
        .map_err(io_err("cannot write", &path))?;
    if changed {
        tracing::info!(path = %path.display(), "wrote the kubeconfig");
    }
    Ok(changed)
}

/// With the agent, the host keeps no credential: a kubeconfig of an earlier install goes.
fn remove_kubeconfig(settings: &Settings) -> Result<(), InstallError> {
    let path = settings.kubeconfig_path();
    match std::fs::remove_file(&path) {
        Ok(()) => {
            tracing::info!(path = %path.display(), "removed the kubeconfig: the node agent serves the plugin");
            Ok(())
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(io_err("cannot remove", &path)(err)),
    }
}

/// Keeps the kubeconfig fresh until `stop` is set; with the agent, keeps the host without one
/// (another writer, an earlier installer stopping during a rollout, may leave one after the
/// start removed it). Writes the flat file again if it goes: without it (removed by hand, by a
/// clean-up of the folder) the plugin would fall back to a local database of its own on every
/// node, and hand out the same addresses as the other nodes. A failed check (the kubelet swapping the
/// token, a full disk) is logged and retried at the next poll rather than ending the pod.
pub fn watch(settings: &Settings, stop: &AtomicBool) {
    // Sleep in short steps so a stop request is honoured promptly.
    let step = settings.poll_interval.min(Duration::from_millis(100));
    while !stop.load(Ordering::Relaxed) {
        let mut slept = Duration::ZERO;
        while slept < settings.poll_interval && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(step);
            slept += step;
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        restore_flat_file(settings);
        if settings.agent {
            if let Err(err) = remove_kubeconfig(settings) {
                tracing::warn!(error = %err, "cannot remove the kubeconfig; retrying");
            }
            continue;
        }
        if let Err(err) = refresh_kubeconfig(settings) {
            tracing::warn!(error = %err, "cannot refresh the kubeconfig; retrying");
        }
    }
}

/// Set by SIGTERM/SIGINT. In a container this process is pid 1, which gets no default signal
/// action, so without a handler the pod would wait out its whole grace period on deletion.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

pub fn run(args: InstallArgs) -> anyhow::Result<()> {
    // The installer's progress goes to the pod log (stderr); ignored if logging is already set up.
    crate::logging::init(None, Some(crate::config::LogLevel::Verbose));
    let settings = Settings::from_args(&args)?;
    if !args.once {
        // Before installing, so that a stop request during the copy is not lost.
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(libc::SIGTERM, handler);
            libc::signal(libc::SIGINT, handler);
        }
    }
    install_once(&settings)?;
    if args.once {
        return Ok(());
    }
    tracing::info!(
        interval_ms = settings.poll_interval.as_millis() as u64,
        "watching the service-account token and CA"
    );
    watch(&settings, &STOP);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_paths_drop_the_mount_prefix() {
        assert_eq!(
            strip_host_prefix(Path::new("/host/etc/cni/net.d")),
            Path::new("/etc/cni/net.d")
        );
        assert_eq!(
            strip_host_prefix(Path::new("/etc/cni/net.d")),
            Path::new("/etc/cni/net.d")
        );
        // Only a whole path component counts.
        assert_eq!(
            strip_host_prefix(Path::new("/hostdir/net.d")),
            Path::new("/hostdir/net.d")
        );
    }
}
