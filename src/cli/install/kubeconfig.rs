//! The kubeconfig the plugin uses on the host: the DaemonSet's service-account token and the
//! cluster CA, pointing at the in-cluster API server address.

use base64::Engine as _;
use serde_json::json;

use super::InstallError;

/// Names inside the kubeconfig. They are what upstream's installer writes, so tools that look
/// for the context by name keep working.
pub const CLUSTER: &str = "local";
pub const USER: &str = "whereabouts";
pub const CONTEXT: &str = "whereabouts-context";

/// `https://host:port`, with an IPv6 address in brackets.
pub fn server_url(host: &str, port: &str) -> Result<String, InstallError> {
    let host = host.trim();
    if host.is_empty() {
        return Err(InstallError::Missing(
            "the API server host (KUBERNETES_SERVICE_HOST or --kubernetes-service-host)",
        ));
    }
    let port: u16 = port.trim().parse().map_err(|_| {
        InstallError::Invalid(format!(
            "the API server port {port:?} (KUBERNETES_SERVICE_PORT) is not a port number"
        ))
    })?;
    Ok(crate::k8s::cluster::service_url(host, port))
}

/// The kubeconfig as YAML. TLS verification stays on: the CA is embedded, so the file works on
/// the host where the container's service-account directory does not exist.
pub fn render(
    server: &str,
    ca_pem: &[u8],
    token: &str,
    namespace: &str,
) -> Result<String, InstallError> {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": CLUSTER,
            "cluster": {"server": server, "certificate-authority-data": ca},
        }],
        "users": [{"name": USER, "user": {"token": token}}],
        "contexts": [{
            "name": CONTEXT,
            "context": {"cluster": CLUSTER, "user": USER, "namespace": namespace},
        }],
        "current-context": CONTEXT,
    });
    let body = serde_saphyr::to_string(&config)
        .map_err(|err| InstallError::Invalid(format!("cannot write the kubeconfig: {err}")))?;
    Ok(format!(
        "# Written by `whereabouts install` from the DaemonSet's service account; rewritten when\n\
         # the token or CA rotates. Do not edit.\n{body}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls() {
        assert_eq!(
            server_url("10.96.0.1", "443").unwrap(),
            "https://10.96.0.1:443"
        );
        assert_eq!(
            server_url("fd00::1", "6443").unwrap(),
            "https://[fd00::1]:6443"
        );
        assert_eq!(
            server_url("api.example", "443").unwrap(),
            "https://api.example:443"
        );
        assert!(server_url("", "443").is_err());
        assert!(server_url("10.0.0.1", "https").is_err());
    }
}
