mod fake_apiserver;
use fake_apiserver::burst::{run_burst, Burst};
use fake_apiserver::cni::netconf;
use fake_apiserver::FakeApiServer;
use serde_json::json;
use std::path::Path;
#[test]
fn timing() {
    let bin = Path::new(env!("CARGO_BIN_EXE_whereabouts"));
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.write_kubeconfig(dir.path(), None);
    let ipam = json!({"type": "whereabouts","range": "10.50.0.0/16","kubernetes": {"kubeconfig": kubeconfig.display().to_string()}, "log_level": "error"});
    let conf = netconf("burst", &ipam);
    server.set_latency(std::time::Duration::from_millis(2));
    for round in 0..3 {
        server.reset_counts();
        let out = run_burst(bin, &conf, &Burst { calls: 100, parallel: 20, nodes: 10, command: if round == 1 { "DEL" } else { "ADD" } }, &[]);
        let failed = out.calls.iter().filter(|c| c.2.code != 0).count();
        eprintln!("wall {:?} p50 {:?} p99 {:?} req/call {:.2} failed {failed} {:?}", out.wall, out.percentile(0.5), out.percentile(0.99), server.requests() as f64 / 100.0, server.requests_by_verb());
    }
}
