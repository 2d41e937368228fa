//! Reaching the cluster, for every part that does: the Kubernetes engine, the controller, the
//! operator's commands and the installer. From the kubeconfig file (or, in a pod, the pod's
//! service account) to a client: the server, the credentials, the namespace, timeouts; and
//! whether this process runs in a pod at all.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tower::util::AndThenLayer;

use super::throttle;
use crate::files::{self, shown, shown_path};

/// Why no client could be made. The message names the file or the setting to fix, never a
/// file's content.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct ClusterError {
    pub what: String,
    #[source]
    pub cause: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl ClusterError {
    fn new(what: impl Into<String>) -> ClusterError {
        ClusterError {
            what: what.into(),
            cause: None,
        }
    }

    fn because(
        what: impl Into<String>,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> ClusterError {
        ClusterError {
            what: what.into(),
            cause: Some(Box::new(cause)),
        }
    }
}

/// The time limits of a client's requests.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub connect: Duration,
    /// Must outlast a watch request, for a client that watches.
    pub read: Duration,
    pub write: Duration,
    /// Whether the client library may repeat a failed request by itself. The engine says no:
    /// its own loop knows which requests are safe to repeat and keeps the operation's deadline.
    pub library_retries: bool,
}

/// Where the objects live when the kubeconfig's context names no namespace (as upstream).
pub const DEFAULT_NAMESPACE: &str = "kube-system";

/// The namespace of the whereabouts objects for a process using its pod's service account (the
/// installer takes the same variable).
pub const NAMESPACE_ENV: &str = "WHEREABOUTS_NAMESPACE";

/// Where the kubelet mounts a pod's service account.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Names another service-account directory (the installer reads the same variable), for a pod
/// that mounts its token elsewhere and for tests, which cannot write the kubelet's path.
pub const SERVICE_ACCOUNT_PATH_ENV: &str = "SERVICE_ACCOUNT_PATH";

pub struct Connection {
    pub client: kube::Client,
    pub namespace: String,
    pub server: String,
    /// Where the server, CA and credentials came from, for messages that must say what to fix.
    pub origin: String,
}

/// How a process reaches the API server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// A kubeconfig file (the plugin's only way: the one its configuration names).
    Kubeconfig(PathBuf),
    /// The service account of the pod this process runs in.
    InCluster,
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Access::Kubeconfig(p) => write!(f, "kubeconfig {}", shown_path(p)),
            Access::InCluster => write!(f, "in-cluster service account"),
        }
    }
}

/// Whether a failed request may succeed when sent again: the server is overloaded or still
/// starting (429, 5xx), the connection failed, or the answer did not parse. A body that does not
/// parse usually comes from something in front of the API server (a proxy, a restarting
/// server); the next attempt may reach the real thing.
pub fn is_transient(err: &kube::Error) -> bool {
    match err {
        kube::Error::Api(status) => matches!(status.code, 429 | 500..=599),
        kube::Error::HyperError(_)
        | kube::Error::Service(_)
        | kube::Error::SerdeError(_)
        | kube::Error::ReadEvents(_) => true,
        _ => false,
    }
}

/// Whether this process runs in a pod: the kubelet sets `KUBERNETES_SERVICE_HOST` in every
/// container, and nothing on a host does.
pub fn in_pod() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|v| !v.is_empty())
}

/// The operator side's choice (commands and the controller, never the plugin): the configured
/// kubeconfig when it exists; inside a pod without it, the pod's service account. A Deployment
/// mounts no node's kubeconfig, and the default path the operator loader fills in names the
/// node's file; outside a pod a missing file stays an error that names it.
pub fn operator_access(kubeconfig: &Path, in_pod: bool) -> Access {
    if in_pod && !kubeconfig.exists() {
        Access::InCluster
    } else {
        Access::Kubeconfig(kubeconfig.to_path_buf())
    }
}

/// The namespace of a process using its service account: `$WHEREABOUTS_NAMESPACE`, else the
/// service account's own namespace, else [`DEFAULT_NAMESPACE`]. The installer writes the node's
/// kubeconfig with the same rule, so the plugin and the controller see the same objects.
pub fn in_cluster_namespace() -> String {
    namespace_from(
        std::env::var(NAMESPACE_ENV).ok().as_deref(),
        &service_account_dir(),
    )
}

/// The pod's service-account directory: `$SERVICE_ACCOUNT_PATH`, else the kubelet's mount.
pub fn service_account_dir() -> PathBuf {
    std::env::var_os(SERVICE_ACCOUNT_PATH_ENV)
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(SERVICE_ACCOUNT_DIR))
}

/// `https://host:port`, with an IPv6 address in brackets.
pub fn service_url(host: &str, port: u16) -> String {
    if host.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    }
}

/// The client configuration of a process in a pod, as the client library's own in-cluster
/// setup makes it (https to `$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`, verified with
/// the mounted CA, the token file re-read as the kubelet rotates it, the CA file too), but
/// from [`service_account_dir`].
pub async fn in_cluster_config() -> Result<kube::Config, ClusterError> {
    let dir = service_account_dir();
    let host = std::env::var("KUBERNETES_SERVICE_HOST").unwrap_or_default();
    if host.trim().is_empty() {
        return Err(ClusterError::new("KUBERNETES_SERVICE_HOST is not set"));
    }
    let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
    let port: u16 = port.trim().parse().map_err(|_| {
        ClusterError::new(format!(
            "KUBERNETES_SERVICE_PORT {:?} is not a port number",
            shown(&port)
        ))
    })?;
    let (ca, token) = (dir.join("ca.crt"), dir.join("token"));
    let kubeconfig: Kubeconfig = serde_json::from_value(serde_json::json!({
        "clusters": [{"name": "in-cluster", "cluster": {
            "server": service_url(host.trim(), port),
            "certificate-authority": ca,
        }}],
        "users": [{"name": "service-account", "user": {"tokenFile": token}}],
        "contexts": [{"name": "in-cluster",
                      "context": {"cluster": "in-cluster", "user": "service-account"}}],
        "current-context": "in-cluster",
    }))
    .map_err(|err| ClusterError::because("cannot describe the in-cluster configuration", err))?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|err| {
                ClusterError::because(
                    format!(
                        "the service account in {} ({SERVICE_ACCOUNT_PATH_ENV})",
                        dir.display()
                    ),
                    err,
                )
            })?;
    config.root_cert_file = Some(ca);
    Ok(config)
}

/// The namespace `env` names, else the one in `service_account`'s `namespace` file, else
/// [`DEFAULT_NAMESPACE`]: the engine and the installer choose it by this one rule.
pub fn namespace_from(env: Option<&str>, service_account: &Path) -> String {
    env.map(str::trim)
        .filter(|ns| !ns.is_empty())
        .map(String::from)
        .or_else(|| {
            std::fs::read_to_string(service_account.join("namespace"))
                .ok()
                .map(|ns| ns.trim().to_string())
                .filter(|ns| !ns.is_empty())
        })
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string())
}

/// The namespace of the kubeconfig's current context, else [`DEFAULT_NAMESPACE`].
pub fn context_namespace(kubeconfig: &Kubeconfig) -> String {
    let current = kubeconfig.current_context.as_deref();
    kubeconfig
        .contexts
        .iter()
        .find(|named| Some(named.name.as_str()) == current)
        .and_then(|named| named.context.as_ref())
        .and_then(|context| context.namespace.clone())
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string())
}

/// Builds the client. Must run inside the caller's tokio runtime: the client starts a task
/// there. `insecure_tls`: the admin's `allow_insecure_tls` (see [`screen_kubeconfig`]).
pub async fn connect(
    access: &Access,
    timeouts: Timeouts,
    insecure_tls: bool,
) -> Result<Connection, ClusterError> {
    match access {
        Access::Kubeconfig(path) => connect_kubeconfig(path, timeouts, insecure_tls).await,
        Access::InCluster => connect_in_cluster(timeouts).await,
    }
}

/// Reads a kubeconfig without following a symbolic link, with a size cap; errors name the
/// file and the position, never its content.
pub fn read_kubeconfig(path: &Path) -> Result<Kubeconfig, ClusterError> {
    let shown = shown_path(path);
    let bytes = files::read_config_file(path)
        .map_err(|err| ClusterError::because("cannot read kubeconfig", err))?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ClusterError::new(format!("kubeconfig {shown} is not UTF-8 text")))?;
    // The parser's own message may quote the file: only the position is kept.
    Kubeconfig::from_yaml(text).map_err(|err| {
        ClusterError::new(format!(
            "cannot parse kubeconfig {shown}: not a valid kubeconfig{}",
            position(&err.to_string())
        ))
    })
}

/// " at line N column M" out of a parser's message, without the rest (which may quote the file).
fn position(message: &str) -> String {
    let Some(at) = message.find("line ") else {
        return String::new();
    };
    let digits = |text: &str| -> String { text.chars().take_while(char::is_ascii_digit).collect() };
    let line = digits(&message[at + 5..]);
    let column = message[at..]
        .find("column ")
        .map(|c| digits(&message[at + c + 7..]))
        .unwrap_or_default();
    match (line.is_empty(), column.is_empty()) {
        (true, _) => String::new(),
        (false, true) => format!(" at line {line}"),
        (false, false) => format!(" at line {line} column {column}"),
    }
}

/// Refuses what a kubeconfig must not make a root process do: run a command (`exec`), load an
/// `auth-provider`, and, unless the admin allows it, skip certificate verification or send
/// credentials over plain `http://`.
pub fn screen_kubeconfig(kubeconfig: &Kubeconfig, insecure_tls: bool) -> Result<(), String> {
    let mut has_credentials = false;
    for named in &kubeconfig.auth_infos {
        let Some(user) = &named.auth_info else {
            continue;
        };
        if user.exec.is_some() {
            return Err(format!(
                "user {:?} runs a command (exec)",
                shown(&named.name)
            ));
        }
        if user.auth_provider.is_some() {
            return Err(format!(
                "user {:?} uses an auth-provider",
                shown(&named.name)
            ));
        }
        has_credentials |= user.token.is_some()
            || user.token_file.is_some()
            || user.password.is_some()
            || user.client_key.is_some()
            || user.client_key_data.is_some();
    }
    if insecure_tls {
        return Ok(());
    }
    for named in &kubeconfig.clusters {
        let Some(cluster) = &named.cluster else {
            continue;
        };
        if cluster.insecure_skip_tls_verify == Some(true) {
            return Err(format!(
                "cluster {:?} sets insecure-skip-tls-verify (allow_insecure_tls in the flat file allows it)",
                shown(&named.name)
            ));
        }
        let plain = cluster
            .server
            .as_deref()
            .is_some_and(|s| s.starts_with("http://"));
        if plain && has_credentials {
            return Err(format!(
                "cluster {:?} is plain http:// and the kubeconfig holds credentials (allow_insecure_tls in the flat file allows it)",
                shown(&named.name)
            ));
        }
    }
    Ok(())
}

/// The files a kubeconfig names (CA, client certificate and key) read here, with the same rules
/// as every file root reads (no symbolic link, regular file, size cap), and put in the kubeconfig
/// as data; so the client library never opens a FIFO or a device the kubeconfig points at. A
/// token file is checked the same way but left to the library, which re-reads it as it rotates.
/// Relative paths are relative to the kubeconfig's folder, as kubectl reads them.
pub fn inline_file_references(
    kubeconfig: &mut Kubeconfig,
    path: &Path,
) -> Result<(), ClusterError> {
    let folder = path.parent().unwrap_or(Path::new("."));
    let read = |field: &str, name: &str| -> Result<String, ClusterError> {
        let file = folder.join(name);
        let bytes = files::read_config_file(&file).map_err(|err| {
            ClusterError::because(
                format!("kubeconfig {}: cannot read its {field}", shown_path(path)),
                err,
            )
        })?;
        Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
    };
    for cluster in kubeconfig
        .clusters
        .iter_mut()
        .filter_map(|c| c.cluster.as_mut())
    {
        if let Some(name) = cluster.certificate_authority.take() {
            cluster.certificate_authority_data = Some(read("certificate-authority", &name)?);
        }
    }
    for user in kubeconfig
        .auth_infos
        .iter_mut()
        .filter_map(|u| u.auth_info.as_mut())
    {
        if let Some(name) = user.client_certificate.take() {
            user.client_certificate_data = Some(read("client-certificate", &name)?);
        }
        if let Some(name) = user.client_key.take() {
            user.client_key_data = Some(read("client-key", &name)?.into());
        }
        if let Some(name) = &user.token_file {
            read("tokenFile", name)?;
            user.token_file = Some(folder.join(name).display().to_string());
        }
    }
    Ok(())
}

async fn connect_kubeconfig(
    path: &Path,
    timeouts: Timeouts,
    insecure_tls: bool,
) -> Result<Connection, ClusterError> {
    let mut kubeconfig = read_kubeconfig(path)?;
    screen_kubeconfig(&kubeconfig, insecure_tls).map_err(|why| {
        ClusterError::new(format!("kubeconfig {} refused: {why}", shown_path(path)))
    })?;
    inline_file_references(&mut kubeconfig, path)?;
    let namespace = context_namespace(&kubeconfig);
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|err| {
            // The library's message may quote the file (a context's or a cluster's name): its
            // cause, which the runtime's reply leaves out.
            ClusterError::because(format!("cannot use kubeconfig {}", shown_path(path)), err)
        })?;
    finish(
        config,
        namespace,
        timeouts,
        &format!("kubeconfig {}", shown_path(path)),
    )
}

async fn connect_in_cluster(timeouts: Timeouts) -> Result<Connection, ClusterError> {
    // The token is read from its file again as the kubelet rotates it: a long-running
    // controller outlives any one token.
    let config = in_cluster_config().await.map_err(|err| {
        ClusterError::because(
            "no kubeconfig, and the pod's service account cannot be used",
            err,
        )
    })?;
    finish(
        config,
        in_cluster_namespace(),
        timeouts,
        &format!(
            "the pod's service account ({})",
            service_account_dir().display()
        ),
    )
}

fn finish(
    mut config: kube::Config,
    namespace: String,
    timeouts: Timeouts,
    origin: &str,
) -> Result<Connection, ClusterError> {
    config.connect_timeout = Some(timeouts.connect);
    config.read_timeout = Some(timeouts.read);
    config.write_timeout = Some(timeouts.write);
    config.default_retry = timeouts.library_retries;
    config.default_namespace = namespace.clone();
    if config.cluster_url.scheme_str() == Some("http") && config.root_cert.is_none() {
        // Plain HTTP never verifies a certificate: skip loading the system trust store, which
        // costs several milliseconds of every plugin call.
        config.root_cert = Some(Vec::new());
    }
    // As messages show it: without user information.
    let server = crate::files::shown_url(&config.cluster_url.to_string());
    let client = kube::client::ClientBuilder::try_from(config)
        .map_err(|err| {
            ClusterError::because(
                format!("cannot build a client for {server} from {origin}"),
                err,
            )
        })?
        .with_layer(&AndThenLayer::new(throttle::keep_retry_after))
        .build();
    Ok(Connection {
        client,
        namespace,
        server,
        origin: origin.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_access_falls_back_to_the_service_account_only_in_a_pod() {
        let dir = tempfile::tempdir().unwrap();
        let present = dir.path().join("whereabouts.kubeconfig");
        std::fs::write(&present, "apiVersion: v1\nkind: Config\n").unwrap();
        let missing = dir.path().join("missing.kubeconfig");
        // An existing kubeconfig always wins, in a pod or not.
        assert_eq!(
            operator_access(&present, true),
            Access::Kubeconfig(present.clone())
        );
        assert_eq!(
            operator_access(&present, false),
            Access::Kubeconfig(present.clone())
        );
        // A missing one: the service account in a pod, the (failing, named) file elsewhere.
        assert_eq!(operator_access(&missing, true), Access::InCluster);
        assert_eq!(
            operator_access(&missing, false),
            Access::Kubeconfig(missing.clone())
        );
    }

    #[test]
    fn files_a_kubeconfig_names_are_read_safely_and_inlined() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.crt"), "CA").unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let path = dir.path().join("kubeconfig");
        let with_ca = |ca: &str| {
            Kubeconfig::from_yaml(&format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://a\n    certificate-authority: {ca}\n"
            ))
            .unwrap()
        };
        let mut relative = with_ca("ca.crt");
        inline_file_references(&mut relative, &path).unwrap();
        let cluster = relative.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.certificate_authority, None);
        assert_eq!(cluster.certificate_authority_data.as_deref(), Some("Q0E="));
        // A FIFO would hang the library's read; a link would lead elsewhere: both refused.
        let err = inline_file_references(&mut with_ca(fifo.to_str().unwrap()), &path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("certificate-authority"), "{err}");
        std::os::unix::fs::symlink(dir.path().join("ca.crt"), dir.path().join("link")).unwrap();
        assert!(inline_file_references(&mut with_ca("link"), &path).is_err());
    }

    #[test]
    fn kubeconfigs_that_run_commands_or_leak_credentials_are_refused() {
        let base = "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: SERVER\nusers:\n- name: u\n  user:\n    USER\n";
        let screen = |server: &str, user: &str, insecure: bool| {
            let text = base.replace("SERVER", server).replace("USER", user);
            screen_kubeconfig(&Kubeconfig::from_yaml(&text).unwrap(), insecure)
        };
        let exec =
            "exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: /bin/sh";
        assert!(screen("https://a", exec, true)
            .unwrap_err()
            .contains("exec"));
        let provider = "auth-provider:\n      name: gcp";
        assert!(screen("https://a", provider, true)
            .unwrap_err()
            .contains("auth-provider"));
        assert!(screen("https://a", "token: t", false).is_ok());
        assert!(screen("http://a", "token: t", false)
            .unwrap_err()
            .contains("http://"));
        assert!(screen("http://a", "token: t", true).is_ok());
        assert!(screen("http://a", "username: nobody", false).is_ok());
        let insecure = base
            .replace("SERVER", "https://a\n    insecure-skip-tls-verify: true")
            .replace("USER", "token: t");
        let kubeconfig = Kubeconfig::from_yaml(&insecure).unwrap();
        assert!(screen_kubeconfig(&kubeconfig, false).is_err());
        assert!(screen_kubeconfig(&kubeconfig, true).is_ok());
    }

    #[test]
    fn parse_errors_name_the_line_not_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(
            &path,
            "apiVersion: v1\nclusters: [\n  MIIEsecretkeyline: {{\n",
        )
        .unwrap();
        let err = read_kubeconfig(&path).unwrap_err().to_string();
        assert!(!err.contains("MIIE") && err.contains("line"), "{err}");
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert!(read_kubeconfig(&path).is_err());
        assert!(read_kubeconfig(Path::new("/dev/zero")).is_err());
    }

    #[test]
    fn in_cluster_namespace_prefers_the_variable_then_the_service_account() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(namespace_from(None, dir.path()), DEFAULT_NAMESPACE);
        std::fs::write(dir.path().join("namespace"), "net-system\n").unwrap();
        assert_eq!(namespace_from(None, dir.path()), "net-system");
        assert_eq!(namespace_from(Some(""), dir.path()), "net-system");
        assert_eq!(namespace_from(Some("ipam"), dir.path()), "ipam");
    }
}
