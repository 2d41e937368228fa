//! The IPAM result, printed in the shape of the version the configuration asked for.

use std::net::IpAddr;

use serde_json::{json, Map, Value};

use super::types::{Dns, Route};
use super::version::at_least;
use crate::ipam::Cidr;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpConfig {
    /// The address with the prefix length of its range.
    pub address: Cidr,
    pub gateway: Option<IpAddr>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpamResult {
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Option<Dns>,
}

impl IpamResult {
    /// The result JSON for `version`: 0.1.0/0.2.0 have `ip4`/`ip6` objects; 0.3.x/0.4.0 an
    /// `ips` list whose items carry `version`, and always `dns`; 1.x neither.
    pub fn to_json(&self, version: &str) -> Value {
        let dns = serde_json::to_value(self.dns.clone().unwrap_or_default()).unwrap_or_default();
        let mut out = Map::new();
        out.insert("cniVersion".into(), version.into());
        if !at_least(version, "0.3.0") {
            for (key, v6) in [("ip4", false), ("ip6", true)] {
                let Some(ip) = self.ips.iter().find(|ip| ip.address.is_v6() == v6) else {
                    continue;
                };
                let mut obj = json!({ "ip": ip.address.to_string() });
                if let Some(gw) = ip.gateway {
                    obj["gateway"] = gw.to_string().into();
                }
                let routes: Vec<&Route> = self
                    .routes
                    .iter()
                    .filter(|r| r.dst.contains(':') == v6)
                    .collect();
                if !routes.is_empty() {
                    obj["routes"] = serde_json::to_value(routes).unwrap_or_default();
                }
                out.insert(key.into(), obj);
            }
            out.insert("dns".into(), dns);
            return Value::Object(out);
        }
        let legacy = !at_least(version, "1.0.0");
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut obj = Map::new();
                if legacy {
                    obj.insert(
                        "version".into(),
                        if ip.address.is_v6() { "6" } else { "4" }.into(),
                    );
                }
                obj.insert("address".into(), ip.address.to_string().into());
                if let Some(gw) = ip.gateway {
                    obj.insert("gateway".into(), gw.to_string().into());
                }
                Value::Object(obj)
            })
            .collect();
        out.insert("ips".into(), ips.into());
        if !self.routes.is_empty() {
            out.insert(
                "routes".into(),
                serde_json::to_value(&self.routes).unwrap_or_default(),
            );
        }
        if legacy || self.dns.as_ref().is_some_and(|d| d != &Dns::default()) {
            out.insert("dns".into(), dns);
        }
        Value::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> IpamResult {
        IpamResult {
            ips: vec![
                IpConfig {
                    address: Cidr::parse("10.0.0.2/24", false).unwrap(),
                    gateway: "10.0.0.1".parse().ok(),
                },
                IpConfig {
                    address: Cidr::parse("fd00::2/64", false).unwrap(),
                    gateway: None,
                },
            ],
            routes: vec![Route {
                dst: "0.0.0.0/0".into(),
                ..Route::default()
            }],
            dns: None,
        }
    }

    #[test]
    fn shapes_per_version() {
        let old = sample().to_json("0.2.0");
        assert_eq!(old["ip4"]["ip"], "10.0.0.2/24");
        assert_eq!(old["ip4"]["gateway"], "10.0.0.1");
        assert_eq!(old["ip4"]["routes"][0]["dst"], "0.0.0.0/0");
        assert_eq!(old["ip6"]["ip"], "fd00::2/64");
        assert!(old.get("ips").is_none());
        let mid = sample().to_json("0.4.0");
        assert_eq!(mid["ips"][0]["version"], "4");
        assert_eq!(mid["ips"][1]["version"], "6");
        assert!(mid.get("dns").is_some());
        let new = sample().to_json("1.0.0");
        assert!(new["ips"][0].get("version").is_none());
        assert!(new.get("dns").is_none());
        assert_eq!(new["cniVersion"], "1.0.0");
    }
}
