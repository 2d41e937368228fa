//! The fake API server's built-in resources and watches answer the way the real API server
//! does where the controller depends on it.

mod fake_apiserver;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use fake_apiserver::FakeApiServer;
use serde_json::{json, Value};

/// The events of one watch request, read until the server ends the stream.
fn watch(server: &FakeApiServer, path_and_query: &str) -> Vec<Value> {
    let port: u16 = server.url().rsplit(':').next().unwrap().parse().unwrap();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path_and_query} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    // Headers, then chunks: a size line and a JSON line each, until the zero-size chunk.
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
    }
    let mut events = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let size = usize::from_str_radix(line.trim(), 16).unwrap();
        if size == 0 {
            return events;
        }
        line.clear();
        reader.read_line(&mut line).unwrap();
        events.push(serde_json::from_str(line.trim()).unwrap());
        line.clear();
        reader.read_line(&mut line).unwrap();
    }
}

fn kinds(events: &[Value]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or_default().to_string(),
                e["object"]["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect()
}

#[test]
fn watches_resume_from_a_resource_version_and_expire_when_compacted() {
    let server = FakeApiServer::start();
    server.add_pod("default", "a", "Running");
    let (code, list) = server.raw("GET", "/api/v1/pods", "", "");
    assert_eq!(code, 200);
    assert_eq!(list["kind"], "PodList");
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    server.add_pod("other", "b", "Pending");
    server.set_pod_phase("other", "b", "Running");
    server.delete_now("pods", "default", "a");
    server.add_node("n1");

    let all = watch(
        &server,
        &format!("/api/v1/pods?watch=true&timeoutSeconds=1&resourceVersion={rv}"),
    );
    assert_eq!(
        kinds(&all),
        [("ADDED", "b"), ("MODIFIED", "b"), ("DELETED", "a")]
            .map(|(k, n)| (k.to_string(), n.to_string()))
    );
    let one_ns = watch(
        &server,
        &format!("/api/v1/namespaces/other/pods?watch=true&timeoutSeconds=1&resourceVersion={rv}"),
    );
    assert_eq!(one_ns.len(), 2);
    // Without a resourceVersion: the current objects, as ADDED.
    let fresh = watch(&server, "/api/v1/pods?watch=true&timeoutSeconds=1");
    assert_eq!(kinds(&fresh), [("ADDED".to_string(), "b".to_string())]);

    server.compact();
    let expired = watch(
        &server,
        &format!("/api/v1/pods?watch=true&timeoutSeconds=1&resourceVersion={rv}"),
    );
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0]["type"], "ERROR");
    assert_eq!(expired[0]["object"]["code"], 410);
    assert_eq!(expired[0]["object"]["reason"], "Expired");
}

#[test]
fn built_in_resources_are_strict() {
    let server = FakeApiServer::start();
    server.add_pod("default", "a", "Running");
    let (code, missing) = server.raw("GET", "/api/v1/namespaces/default/pods/nope", "", "");
    assert_eq!((code, missing["reason"].as_str()), (404, Some("NotFound")));
    // An event must name an object in its own namespace.
    let event = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
        "metadata": {"generateName": "a."},
        "regarding": {"kind": "Pod", "name": "a", "namespace": "elsewhere"},
        "reason": "X"});
    let (code, body) = server.raw(
        "POST",
        "/apis/events.k8s.io/v1/namespaces/default/events",
        "application/json",
        &event.to_string(),
    );
    assert_eq!(code, 422, "{body}");
    let mut good = event.clone();
    good["regarding"]["namespace"] = json!("default");
    let (code, created) = server.raw(
        "POST",
        "/apis/events.k8s.io/v1/namespaces/default/events",
        "application/json",
        &good.to_string(),
    );
    assert_eq!(code, 201, "{created}");
    assert!(created["metadata"]["name"]
        .as_str()
        .unwrap()
        .starts_with("a."));
    // A stale resourceVersion is a conflict; a missing one is invalid.
    let (_, pod) = server.raw("GET", "/api/v1/namespaces/default/pods/a", "", "");
    server.set_pod_phase("default", "a", "Succeeded");
    let (code, _) = server.raw(
        "PUT",
        "/api/v1/namespaces/default/pods/a",
        "application/json",
        &pod.to_string(),
    );
    assert_eq!(code, 409);
    let mut no_rv = pod.clone();
    no_rv["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    let (code, _) = server.raw(
        "PUT",
        "/api/v1/namespaces/default/pods/a",
        "application/json",
        &no_rv.to_string(),
    );
    assert_eq!(code, 422);
    let (code, _) = server.raw(
        "POST",
        "/api/v1/namespaces/default/pods",
        "application/json",
        &pod.to_string(),
    );
    assert_eq!(code, 422, "resourceVersion set on create");
    // Nodes are cluster-scoped.
    server.add_node("n1");
    let (code, nodes) = server.raw("GET", "/api/v1/nodes", "", "");
    assert_eq!((code, nodes["items"].as_array().unwrap().len()), (200, 1));
    let (code, _) = server.raw("GET", "/api/v1/namespaces/default/nodes", "", "");
    assert_eq!(code, 404);
}
