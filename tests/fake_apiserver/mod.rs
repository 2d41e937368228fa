//! A strict, in-memory Kubernetes API server for the three Whereabouts custom resources, served
//! over HTTP on loopback. It answers the way the real one does where the engine depends on it:
//! 409 Conflict for a stale resourceVersion, 409 AlreadyExists, 404 NotFound, 422 for a failed
//! JSON-patch test and for an update without resourceVersion, Status objects as error bodies,
//! schema validation and pruning after the project's CRDs in deploy/ (tests/deploy.rs holds them
//! to upstream's wire contract, so objects are pruned as upstream's CRDs prune them). Tests can
//! add latency, inject failures, take it down, and count requests.

#![allow(dead_code)]

pub mod core;
mod http;
mod patch;
mod schema;
pub mod watch;

use std::collections::BTreeMap;
use std::io::BufReader;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

pub const GROUP: &str = "whereabouts.cni.cncf.io";
pub const VERSION: &str = "v1alpha1";

struct Crd {
    kind: String,
    schema: Value,
}

#[derive(Default)]
struct State {
    crds: BTreeMap<String, Crd>,
    /// (plural, namespace, name) -> object
    objects: BTreeMap<(String, String, String), Value>,
    revision: u64,
    uids: u64,
    /// Changes of the built-in resources, for watches.
    log: watch::Log,
}

struct FailRule {
    method: String,
    plural: String,
    remaining: u64,
    /// The request is carried out and only its answer is an error (a timeout after the write).
    applied: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    latency_us: AtomicU64,
    fail_all: AtomicBool,
    /// Seconds of `Retry-After` every request is shed with (429); 0 when none is.
    shed_all: AtomicU32,
    down: AtomicBool,
    stop: AtomicBool,
    rules: Mutex<Vec<FailRule>>,
    requests: AtomicU64,
    by_verb: Mutex<BTreeMap<String, u64>>,
    gate: Gate,
    /// Requests received and not yet answered (watches excepted).
    in_flight: AtomicU64,
}

/// Counts a request in flight until dropped, once it is answered.
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn enter(count: &'a AtomicU64) -> InFlight<'a> {
        count.fetch_add(1, Ordering::SeqCst);
        InFlight(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Requests of one verb held unanswered until the gate opens (see [`FakeApiServer::close_gate`]).
#[derive(Default)]
struct Gate {
    /// ("METHOD", plural) while closed.
    closed: Mutex<Option<(String, String)>>,
    opened: std::sync::Condvar,
    waiting: AtomicU64,
}

impl Gate {
    /// Waits while the gate is closed to `method` on `plural`.
    fn pass(&self, method: &str, plural: &str) {
        let mut closed = self.closed.lock().unwrap();
        let held = |c: &Option<(String, String)>| {
            c.as_ref().is_some_and(|(m, p)| m == method && p == plural)
        };
        if !held(&closed) {
            return;
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        while held(&closed) {
            closed = self.opened.wait(closed).unwrap();
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct FakeApiServer {
    shared: Arc<Shared>,
    port: u16,
}

/// The folder of the project's install files, the CRDs among them.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// The CustomResourceDefinitions among the documents of `dir`'s YAML files.
fn crds_in(dir: &Path) -> Vec<Value> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    paths.sort();
    let mut crds = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("parse {}: {e}", path.display()));
        crds.extend(
            docs.into_iter()
                .filter(|d| d["kind"] == "CustomResourceDefinition"),
        );
    }
    assert!(!crds.is_empty(), "no CRD in {}", dir.display());
    crds
}

impl FakeApiServer {
    /// A server with the project's CRDs installed.
    pub fn start() -> FakeApiServer {
        let server = FakeApiServer::start_without_crds();
        server.install_crds(&deploy_dir());
        server
    }

    /// A server on which no CRD is installed (every resource is 404).
    fn start_without_crds() -> FakeApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let port = listener.local_addr().expect("local addr").port();
        let shared = Arc::new(Shared::default());
        let accept_shared = shared.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if accept_shared.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                if accept_shared.down.load(Ordering::SeqCst) {
                    let _ = stream.shutdown(Shutdown::Both);
                    continue;
                }
                let conn_shared = accept_shared.clone();
                std::thread::spawn(move || serve(conn_shared, stream));
            }
        });
        FakeApiServer { shared, port }
    }

    /// Installs every CustomResourceDefinition in the YAML files of `dir`, as `kubectl apply`
    /// would; other objects there are not this server's business and are passed over.
    pub fn install_crds(&self, dir: &Path) {
        let mut state = self.shared.state.lock().unwrap();
        for crd in crds_in(dir) {
            let spec = &crd["spec"];
            assert_eq!(spec["group"], GROUP, "{}", crd["metadata"]["name"]);
            let version = spec["versions"]
                .as_array()
                .and_then(|v| v.iter().find(|v| v["name"] == VERSION))
                .unwrap_or_else(|| panic!("{}: no {VERSION}", crd["metadata"]["name"]));
            let plural = spec["names"]["plural"].as_str().unwrap().to_string();
            state.crds.insert(
                plural,
                Crd {
                    kind: spec["names"]["kind"].as_str().unwrap().to_string(),
                    schema: version["schema"]["openAPIV3Schema"].clone(),
                },
            );
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Writes a kubeconfig pointing at this server, with `namespace` in its context.
    pub fn write_kubeconfig(&self, dir: &Path, namespace: Option<&str>) -> PathBuf {
        write_kubeconfig(dir, &self.url(), namespace)
    }

    /// Added before every answer.
    pub fn set_latency(&self, latency: Duration) {
        self.shared
            .latency_us
            .store(latency.as_micros() as u64, Ordering::SeqCst);
    }

    /// Every request answered 500.
    pub fn set_fail_all(&self, fail: bool) {
        self.shared.fail_all.store(fail, Ordering::SeqCst);
    }

    /// Every request shed as an API server sheds a flow over its share: 429 with a plain-text
    /// body and `Retry-After: seconds` (0: none shed). A real server cannot be made to shed
    /// every request: API Priority and Fairness lets one through whenever its level runs none.
    pub fn set_shedding(&self, seconds: u32) {
        self.shared.shed_all.store(seconds, Ordering::SeqCst);
    }

    /// Connections are dropped without an answer (new ones right after accept).
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// The next `count` requests of `method` on `plural` are answered 500.
    pub fn fail_next(&self, method: &str, plural: &str, count: u64) {
        self.shared.rules.lock().unwrap().push(FailRule {
            method: method.to_string(),
            plural: plural.to_string(),
            remaining: count,
            applied: false,
        });
    }

    /// The next `count` requests of `method` on `plural` are carried out, then answered 504 (a
    /// gateway timing out after the write): the client cannot tell that they were applied.
    pub fn fail_next_after_applying(&self, method: &str, plural: &str, count: u64) {
        self.shared.rules.lock().unwrap().push(FailRule {
            method: method.to_string(),
            plural: plural.to_string(),
            remaining: count,
            applied: true,
        });
    }

    /// Requests of `method` on `plural` wait, unanswered, until [`FakeApiServer::open_gate`]:
    /// a test holds a client at one step of its work while others arrive.
    pub fn close_gate(&self, method: &str, plural: &str) {
        *self.shared.gate.closed.lock().unwrap() = Some((method.to_string(), plural.to_string()));
    }

    pub fn open_gate(&self) {
        *self.shared.gate.closed.lock().unwrap() = None;
        self.shared.gate.opened.notify_all();
    }

    /// How many requests wait at the closed gate.
    pub fn waiting_at_gate(&self) -> u64 {
        self.shared.gate.waiting.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Whether every request received (watches excepted) has been carried out and answered:
    /// what a client sent before it went away is in the state or never will be.
    pub fn settled(&self) -> bool {
        self.shared.in_flight.load(Ordering::SeqCst) == 0
    }

    /// Requests by "METHOD plural".
    pub fn requests_by_verb(&self) -> BTreeMap<String, u64> {
        self.shared.by_verb.lock().unwrap().clone()
    }

    pub fn reset_counts(&self) {
        self.shared.requests.store(0, Ordering::SeqCst);
        self.shared.by_verb.lock().unwrap().clear();
    }

    pub fn get(&self, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let state = self.shared.state.lock().unwrap();
        state
            .objects
            .get(&(plural.into(), namespace.into(), name.into()))
            .cloned()
    }

    pub fn list(&self, plural: &str, namespace: &str) -> Vec<Value> {
        let state = self.shared.state.lock().unwrap();
        state
            .objects
            .iter()
            .filter(|((p, ns, _), _)| p == plural && ns == namespace)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Creates an object as a client would (validated, pruned); panics if refused.
    pub fn create(&self, plural: &str, namespace: &str, object: Value) -> Value {
        let mut state = self.shared.state.lock().unwrap();
        match create(&mut state, plural, namespace, object, false) {
            (201, body) => body,
            (code, body) => panic!("create {plural} refused: {code} {body}"),
        }
    }

    /// Sends a raw request through HTTP, for tests of the server itself.
    pub fn raw(&self, method: &str, path: &str, content_type: &str, body: &str) -> (u16, Value) {
        use std::io::{Read, Write};
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(req.as_bytes()).unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        let code = text[9..12].parse().unwrap();
        let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
        (code, serde_json::from_str(body).unwrap_or(Value::Null))
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

pub fn write_kubeconfig(dir: &Path, server: &str, namespace: Option<&str>) -> PathBuf {
    let ns_line = namespace
        .map(|ns| format!("    namespace: {ns}\n"))
        .unwrap_or_default();
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {server}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n{ns_line}current-context: fake\nusers:\n- name: fake\n  user:\n    token: fake-token\n"
    );
    let path = dir.join("whereabouts.kubeconfig");
    std::fs::write(&path, text).unwrap();
    path
}

fn serve(shared: Arc<Shared>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    loop {
        let req = match http::read_request(&mut reader) {
            Ok(Some(req)) => req,
            _ => return,
        };
        if shared.down.load(Ordering::SeqCst) || shared.stop.load(Ordering::SeqCst) {
            let _ = writer.shutdown(Shutdown::Both);
            return;
        }
        // The resource's plural for counts and the gate, of whereabouts' group or another.
        let plural = path_parts(&req.path)
            .map(|p| p.1)
            .or_else(|| core::target(&req.path).map(|t| t.resource.plural.to_string()))
            .unwrap_or_default();
        shared.requests.fetch_add(1, Ordering::SeqCst);
        *shared
            .by_verb
            .lock()
            .unwrap()
            .entry(format!("{} {plural}", req.method))
            .or_default() += 1;
        let latency = shared.latency_us.load(Ordering::SeqCst);
        if latency > 0 {
            std::thread::sleep(Duration::from_micros(latency));
        }
        let watching = watch::is_watch(&req);
        let _answering = (!watching).then(|| InFlight::enter(&shared.in_flight));
        shared.gate.pass(&req.method, &plural);
        if watching {
            if watch::stream(&shared, &req, &mut writer) {
                continue;
            }
            return;
        }
        let shed = shared.shed_all.load(Ordering::SeqCst);
        if shed > 0 {
            if http::write_shed(&mut writer, shed).is_err() || req.close {
                return;
            }
            continue;
        }
        let injected = injected_failure(&shared, &req.method, &plural);
        let (code, body) = if injected == Some(false) {
            status(500, "InternalError", "an error on the server (\"fault injected\") has prevented the request from succeeding", None)
        } else if injected == Some(true) {
            let mut state = shared.state.lock().unwrap();
            handle(&mut state, &req);
            status(504, "Timeout", "the server was unable to return a response in the time allotted (\"fault injected\")", None)
        } else {
            let mut state = shared.state.lock().unwrap();
            handle(&mut state, &req)
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        if http::write_response(&mut writer, code, &bytes).is_err() || req.close {
            return;
        }
    }
}

/// Whether this request fails: `Some(applied)`, where `applied` says it is carried out first.
fn injected_failure(shared: &Shared, method: &str, plural: &str) -> Option<bool> {
    if shared.fail_all.load(Ordering::SeqCst) {
        return Some(false);
    }
    let mut rules = shared.rules.lock().unwrap();
    for rule in rules.iter_mut() {
        if rule.remaining > 0 && rule.method == method && rule.plural == plural {
            rule.remaining -= 1;
            return Some(rule.applied);
        }
    }
    None
}

/// (namespace, plural, name) of `/apis/<group>/<version>/namespaces/<ns>/<plural>[/<name>]`.
pub(crate) fn path_parts(path: &str) -> Option<(String, String, Option<String>)> {
    let rest = path.strip_prefix(&format!("/apis/{GROUP}/{VERSION}/namespaces/"))?;
    let mut parts = rest.split('/');
    let ns = parts.next()?.to_string();
    let plural = parts.next()?.to_string();
    let name = parts.next().filter(|n| !n.is_empty()).map(str::to_string);
    if parts.next().is_some() {
        return None;
    }
    Some((ns, plural, name))
}

fn status(code: u16, reason: &str, message: &str, details: Option<Value>) -> (u16, Value) {
    let mut body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(details) = details {
        body["details"] = details;
    }
    (code, body)
}

fn details(plural: &str, name: &str) -> Option<Value> {
    Some(json!({"name": name, "group": GROUP, "kind": plural}))
}

fn not_found(plural: &str, name: &str) -> (u16, Value) {
    status(
        404,
        "NotFound",
        &format!("{plural}.{GROUP} \"{name}\" not found"),
        details(plural, name),
    )
}

fn conflict(plural: &str, name: &str, why: &str) -> (u16, Value) {
    status(
        409,
        "Conflict",
        &format!("Operation cannot be fulfilled on {plural}.{GROUP} \"{name}\": {why}"),
        details(plural, name),
    )
}

fn invalid(kind: &str, plural: &str, name: &str, errors: &[String]) -> (u16, Value) {
    status(
        422,
        "Invalid",
        &format!(
            "{kind}.{GROUP} \"{name}\" is invalid: {}",
            errors.join(", ")
        ),
        details(plural, name),
    )
}

fn handle(state: &mut State, req: &http::Request) -> (u16, Value) {
    if let Some(answer) = core::handle(state, req) {
        return answer;
    }
    let Some((ns, plural, name)) = path_parts(&req.path) else {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
            None,
        );
    };
    if !state.crds.contains_key(&plural) {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
            None,
        );
    }
    let body = || serde_json::from_slice::<Value>(&req.body);
    match (req.method.as_str(), name) {
        ("GET", None) => list(state, &plural, &ns, &req.query),
        ("GET", Some(name)) => match state.objects.get(&(plural.clone(), ns, name.clone())) {
            Some(obj) => (200, obj.clone()),
            None => not_found(&plural, &name),
        },
        ("POST", None) => match body() {
            Ok(obj) => {
                let dry_run = req.query.split('&').any(|kv| kv == "dryRun=All");
                create(state, &plural, &ns, obj, dry_run)
            }
            Err(e) => status(400, "BadRequest", &format!("invalid JSON: {e}"), None),
        },
        ("PUT", Some(name)) => match body() {
            Ok(obj) => update(state, &plural, &ns, &name, obj),
            Err(e) => status(400, "BadRequest", &format!("invalid JSON: {e}"), None),
        },
        ("PATCH", Some(name)) => match body() {
            Ok(patch) => patch_object(state, &plural, &ns, &name, &req.content_type, patch),
            Err(e) => status(400, "BadRequest", &format!("invalid JSON: {e}"), None),
        },
        ("DELETE", Some(name)) => {
            let options = body().unwrap_or(Value::Null);
            delete(state, &plural, &ns, &name, &options)
        }
        (method, _) => status(
            405,
            "MethodNotAllowed",
            &format!("{method} is not supported here"),
            None,
        ),
    }
}

fn list(state: &State, plural: &str, ns: &str, query: &str) -> (u16, Value) {
    let limit = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "limit")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let items: Vec<Value> = state
        .objects
        .iter()
        .filter(|((p, n, _), _)| p == plural && n == ns)
        .map(|(_, v)| v.clone())
        .take(limit)
        .collect();
    let kind = &state.crds[plural].kind;
    (
        200,
        json!({
            "apiVersion": format!("{GROUP}/{VERSION}"),
            "kind": format!("{kind}List"),
            "metadata": {"resourceVersion": state.revision.to_string()},
            "items": items,
        }),
    )
}

fn is_dns_subdomain(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 253
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'.')
}

/// Type checks, kind/apiVersion checks and pruning; the errors of the object, if any.
fn admit(state: &State, plural: &str, obj: &mut Value) -> Result<(), Vec<String>> {
    let crd = &state.crds[plural];
    let mut errors = Vec::new();
    if obj["apiVersion"] != format!("{GROUP}/{VERSION}") {
        errors.push(format!("apiVersion: Invalid value: {}", obj["apiVersion"]));
    }
    if obj["kind"] != crd.kind.as_str() {
        errors.push(format!("kind: Invalid value: {}", obj["kind"]));
    }
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if !is_dns_subdomain(&name) {
        errors.push(format!(
            "metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
        ));
    }
    schema::validate_and_prune(obj, &crd.schema, "", &mut errors);
    for e in errors.iter_mut() {
        if let Some(stripped) = e.strip_prefix('.') {
            *e = stripped.to_string();
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A create; with `dry_run` (`?dryRun=All`) answered as the server would, nothing stored.
fn create(
    state: &mut State,
    plural: &str,
    ns: &str,
    mut obj: Value,
    dry_run: bool,
) -> (u16, Value) {
    let kind = state.crds[plural].kind.clone();
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if let Some(body_ns) = obj["metadata"]["namespace"].as_str() {
        if body_ns != ns {
            return status(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
                None,
            );
        }
    }
    if obj["metadata"]
        .get("resourceVersion")
        .is_some_and(|v| !v.is_null())
    {
        return invalid(
            &kind,
            plural,
            &name,
            &["metadata.resourceVersion: Invalid value: must not be set on create".into()],
        );
    }
    if let Err(errors) = admit(state, plural, &mut obj) {
        return invalid(&kind, plural, &name, &errors);
    }
    let key = (plural.to_string(), ns.to_string(), name.clone());
    if state.objects.contains_key(&key) {
        return status(
            409,
            "AlreadyExists",
            &format!("{plural}.{GROUP} \"{name}\" already exists"),
            details(plural, &name),
        );
    }
    if dry_run {
        return (201, obj);
    }
    state.revision += 1;
    state.uids += 1;
    let meta = &mut obj["metadata"];
    meta["namespace"] = json!(ns);
    meta["resourceVersion"] = json!(state.revision.to_string());
    meta["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", state.uids));
    meta["creationTimestamp"] = json!(now_rfc3339());
    meta["generation"] = json!(1);
    state.objects.insert(key, obj.clone());
    watch::record(state, "ADDED", plural, ns, &obj);
    (201, obj)
}

/// Stores `obj` as the new state of an existing object after the checks of an update.
fn replace_checked(
    state: &mut State,
    plural: &str,
    ns: &str,
    name: &str,
    mut obj: Value,
) -> (u16, Value) {
    let kind = state.crds[plural].kind.clone();
    let key = (plural.to_string(), ns.to_string(), name.to_string());
    let Some(current) = state.objects.get(&key).cloned() else {
        return not_found(plural, name);
    };
    if obj["metadata"]["name"].as_str() != Some(name) {
        return status(
            400,
            "BadRequest",
            "the name of the object does not match the name on the URL",
            None,
        );
    }
    let Some(rv) = obj["metadata"]["resourceVersion"]
        .as_str()
        .map(str::to_string)
    else {
        return invalid(
            &kind,
            plural,
            name,
            &[
                "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update"
                    .into(),
            ],
        );
    };
    if Some(rv.as_str()) != current["metadata"]["resourceVersion"].as_str() {
        return conflict(
            plural,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        );
    }
    if let Some(uid) = obj["metadata"]["uid"].as_str() {
        if Some(uid) != current["metadata"]["uid"].as_str() {
            return conflict(
                plural,
                name,
                "Precondition failed: UID in object meta does not match",
            );
        }
    }
    if let Err(errors) = admit(state, plural, &mut obj) {
        return invalid(&kind, plural, name, &errors);
    }
    state.revision += 1;
    let meta = &mut obj["metadata"];
    meta["namespace"] = json!(ns);
    meta["resourceVersion"] = json!(state.revision.to_string());
    meta["uid"] = current["metadata"]["uid"].clone();
    meta["creationTimestamp"] = current["metadata"]["creationTimestamp"].clone();
    let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
    let spec_changed = obj["spec"] != current["spec"];
    obj["metadata"]["generation"] = json!(if spec_changed {
        generation + 1
    } else {
        generation
    });
    state.objects.insert(key, obj.clone());
    watch::record(state, "MODIFIED", plural, ns, &obj);
    (200, obj)
}

fn update(state: &mut State, plural: &str, ns: &str, name: &str, obj: Value) -> (u16, Value) {
    replace_checked(state, plural, ns, name, obj)
}

fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            for (k, v) in p {
                if v.is_null() {
                    if let Some(t) = target.as_object_mut() {
                        t.remove(k);
                    }
                } else {
                    merge_patch(&mut target[k.as_str()], v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn patch_object(
    state: &mut State,
    plural: &str,
    ns: &str,
    name: &str,
    content_type: &str,
    patch_body: Value,
) -> (u16, Value) {
    let key = (plural.to_string(), ns.to_string(), name.to_string());
    let Some(current) = state.objects.get(&key).cloned() else {
        return not_found(plural, name);
    };
    let mut obj = current.clone();
    let media = content_type.split(';').next().unwrap_or_default().trim();
    match media {
        "application/json-patch+json" => {
            if let Err(err) = patch::apply(&mut obj, &patch_body) {
                let why = match err {
                    patch::PatchError::TestFailed(m) | patch::PatchError::Invalid(m) => m,
                };
                return status(
                    422,
                    "Invalid",
                    &format!("the server rejected our request due to an error in our request: {why}"),
                    details(plural, name),
                );
            }
        }
        "application/merge-patch+json" => merge_patch(&mut obj, &patch_body),
        other => {
            return status(
                415,
                "UnsupportedMediaType",
                &format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json (got {other:?})"),
                None,
            )
        }
    }
    // A patch carries the resourceVersion of the patched object as a precondition.
    if obj["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
        return conflict(
            plural,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        );
    }
    replace_checked(state, plural, ns, name, obj)
}

fn delete(state: &mut State, plural: &str, ns: &str, name: &str, options: &Value) -> (u16, Value) {
    let key = (plural.to_string(), ns.to_string(), name.to_string());
    let Some(current) = state.objects.get(&key).cloned() else {
        return not_found(plural, name);
    };
    let pre = &options["preconditions"];
    if let Some(uid) = pre["uid"].as_str() {
        if Some(uid) != current["metadata"]["uid"].as_str() {
            return conflict(
                plural,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    current["metadata"]["uid"].as_str().unwrap_or_default()
                ),
            );
        }
    }
    if let Some(rv) = pre["resourceVersion"].as_str() {
        if Some(rv) != current["metadata"]["resourceVersion"].as_str() {
            return conflict(
                plural,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    current["metadata"]["resourceVersion"].as_str().unwrap_or_default()
                ),
            );
        }
    }
    state.objects.remove(&key);
    state.revision += 1;
    let mut gone = current.clone();
    gone["metadata"]["resourceVersion"] = json!(state.revision.to_string());
    watch::record(state, "DELETED", plural, ns, &gone);
    (
        200,
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {"name": name, "group": GROUP, "kind": plural, "uid": current["metadata"]["uid"]},
        }),
    )
}

pub mod burst;
pub mod cni;
pub mod harness;
