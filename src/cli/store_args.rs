//! How the operator's commands find the store: the same configuration the plugin reads (a
//! network configuration file, else the flat file), with flags that override it.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::{json, Value};

use crate::config::{self, Datastore, IpamConfig};
use crate::store::{self, Store};

#[derive(clap::Args, Debug, Clone, Default)]
pub struct StoreArgs {
    /// A network configuration (or configuration list, or bare `ipam` object) to read the
    /// store settings and ranges from. Without it, the flat file the plugin reads.
    #[arg(long, short = 'c', env = "WHEREABOUTS_CONFIG")]
    pub config: Option<PathBuf>,
    /// The engine: local, kubernetes or etcd.
    #[arg(long)]
    pub datastore: Option<String>,
    /// The SQLite database of the local engine.
    #[arg(long)]
    pub local_path: Option<PathBuf>,
    /// The kubeconfig of the Kubernetes engine.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The namespace of the Kubernetes engine's objects (IPPools, reservations), over the
    /// kubeconfig context's (default: the context's, else kube-system; in a pod without a
    /// kubeconfig, $WHEREABOUTS_NAMESPACE, else the service account's). The controller also
    /// keeps its Lease, its ConfigMap and the NodeSlicePools there.
    #[arg(long)]
    pub namespace: Option<String>,
    /// The etcd endpoints, comma separated.
    #[arg(long)]
    pub etcd_host: Option<String>,
}

/// Whether `name` can name a namespace (an RFC 1123 label).
fn is_namespace_name(name: &str) -> bool {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    (1..=63).contains(&name.len())
        && name.chars().all(allowed)
        && !name.starts_with('-')
        && !name.ends_with('-')
}

impl StoreArgs {
    /// The configuration, with the flags applied over it.
    pub fn ipam(&self) -> anyhow::Result<IpamConfig> {
        self.ipam_loaded_by(|ipam| config::load_for_operator(Some(ipam)))
    }

    /// As [`StoreArgs::ipam`], the configuration loaded by `load` (the tests' own flat files).
    fn ipam_loaded_by(
        &self,
        load: impl FnOnce(&serde_json::Value) -> Result<IpamConfig, config::ConfigError>,
    ) -> anyhow::Result<IpamConfig> {
        let mut cfg = load(&self.ipam_object()?).map_err(|e| anyhow::anyhow!(e.describe()))?;
        if let Some(namespace) = &self.namespace {
            if !is_namespace_name(namespace) {
                anyhow::bail!(
                    "--namespace {:?} is not a namespace name (lower-case letters, digits and \
                     '-', at most 63)",
                    crate::files::shown(namespace)
                );
            }
            if let Datastore::Kubernetes(k8s) = &mut cfg.datastore {
                k8s.namespace = Some(namespace.clone());
            }
        }
        Ok(cfg)
    }

    /// The `ipam` object: the configuration file's (or a bare one), with the flags set in it.
    pub fn ipam_object(&self) -> anyhow::Result<Value> {
        let mut ipam = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                let file: Value = serde_json::from_str(&text)
                    .with_context(|| format!("cannot parse {}", path.display()))?;
                config::ipam_of(&file).with_context(|| {
                    format!("{} has no ipam object of type whereabouts", path.display())
                })?
            }
            None => json!({"type": "whereabouts"}),
        };
        // A flag's key replaces the file's in whatever case it is written there.
        let set = |ipam: &mut Value, key: &str, value: Value| {
            if let Some(map) = ipam.as_object_mut() {
                map.retain(|k, _| !config::same_key(k, key));
                map.insert(key.to_string(), value);
            }
        };
        // A store flag alone names its engine, over the engine the file or the flat file names
        // (the installer's flat file always says "kubernetes").
        let implied = match (&self.local_path, &self.kubeconfig, &self.etcd_host) {
            (Some(_), None, None) => Some("local"),
            (None, Some(_), None) => Some("kubernetes"),
            (None, None, Some(_)) => Some("etcd"),
            _ => None,
        };
        if let Some(d) = self.datastore.as_deref().or(implied) {
            set(&mut ipam, "datastore", d.into());
        }
        if let Some(p) = &self.local_path {
            set(&mut ipam, "local_path", p.to_string_lossy().into());
        }
        if let Some(k) = &self.kubeconfig {
            set(&mut ipam, "kubernetes", json!({ "kubeconfig": k }));
        }
        if let Some(h) = &self.etcd_host {
            set(&mut ipam, "etcd_host", h.as_str().into());
        }
        Ok(ipam)
    }

    /// The configuration and its store.
    pub fn open(&self) -> anyhow::Result<(IpamConfig, Box<dyn Store>)> {
        let cfg = self.ipam()?;
        // The commands look at a node's database: one that is not there (a mistyped path, a
        // flat file not found) is an error, not an empty store made on the spot that reads
        // "nothing allocated".
        if let Datastore::Local { path } = &cfg.datastore {
            if std::fs::symlink_metadata(path).is_err() {
                anyhow::bail!(
                    "no local database at {} (--local-path, else the flat file's local_path)",
                    path.display()
                );
            }
        }
        let store = store::open_for_operator(&cfg).map_err(anyhow::Error::new)?;
        Ok((cfg, store))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store flag alone selects its engine over a file naming another (the installer's flat
    /// file names kubernetes), whatever the case of the file's keys; --datastore wins over it.
    #[test]
    fn a_store_flag_names_its_engine() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("net.conf");
        let file = json!({"type": "whereabouts", "Datastore": "kubernetes",
            "kubernetes": {"kubeconfig": "/etc/cni/net.d/whereabouts.d/whereabouts.kubeconfig"}});
        std::fs::write(&conf, file.to_string()).unwrap();
        let local = StoreArgs {
            config: Some(conf.clone()),
            local_path: Some(dir.path().join("old.db")),
            ..StoreArgs::default()
        };
        let cfg = local
            .ipam_loaded_by(|ipam| config::load_for_operator_with_flat_files(Some(ipam), &[]))
            .unwrap();
        assert!(
            matches!(cfg.datastore, Datastore::Local { .. }),
            "{:?}",
            cfg.datastore
        );
        let etcd = StoreArgs {
            config: Some(conf),
            etcd_host: Some("https://etcd.example:2379".into()),
            datastore: Some("kubernetes".into()),
            ..StoreArgs::default()
        };
        assert_eq!(etcd.ipam_object().unwrap()["datastore"], "kubernetes");
    }
}
