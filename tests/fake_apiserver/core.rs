//! Built-in resources the controller reads and writes: pods, nodes, config maps (core v1),
//! events (events.k8s.io/v1), leases (coordination.k8s.io/v1) and NetworkAttachmentDefinitions
//! (k8s.cni.cncf.io/v1). They live in the same object map
//! and share the same resourceVersion counter as the custom resources, and every change is
//! recorded for watches ([`super::watch`]).

use serde_json::{json, Value};

use super::{is_dns_subdomain, now_rfc3339, FakeApiServer, State};

/// A built-in resource: its plural, kind, apiVersion and whether it is namespaced.
pub struct Resource {
    pub plural: &'static str,
    pub kind: &'static str,
    pub api_version: &'static str,
    pub namespaced: bool,
}

pub const RESOURCES: [Resource; 6] = [
    Resource {
        plural: "pods",
        kind: "Pod",
        api_version: "v1",
        namespaced: true,
    },
    Resource {
        plural: "nodes",
        kind: "Node",
        api_version: "v1",
        namespaced: false,
    },
    // Events as kube's Recorder posts them.
    Resource {
        plural: "events",
        kind: "Event",
        api_version: "events.k8s.io/v1",
        namespaced: true,
    },
    Resource {
        plural: "leases",
        kind: "Lease",
        api_version: "coordination.k8s.io/v1",
        namespaced: true,
    },
    Resource {
        plural: "configmaps",
        kind: "ConfigMap",
        api_version: "v1",
        namespaced: true,
    },
    Resource {
        plural: "network-attachment-definitions",
        kind: "NetworkAttachmentDefinition",
        api_version: "k8s.cni.cncf.io/v1",
        namespaced: true,
    },
];

/// A request path resolved: the resource, the namespace (None: all namespaces or
/// cluster-scoped) and the object's name.
pub struct Target {
    pub resource: &'static Resource,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

/// Resolves `/api/v1/...` and `/apis/k8s.cni.cncf.io/v1/...` paths.
pub fn target(path: &str) -> Option<Target> {
    let (api_version, rest) = if let Some(rest) = path.strip_prefix("/api/v1/") {
        ("v1", rest)
    } else {
        let rest = path.strip_prefix("/apis/")?;
        let group = [
            "k8s.cni.cncf.io/v1",
            "events.k8s.io/v1",
            "coordination.k8s.io/v1",
        ]
        .into_iter()
        .find(|g| rest.starts_with(&format!("{g}/")))?;
        (group, &rest[group.len() + 1..])
    };
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    let (namespace, plural, name) = match parts.as_slice() {
        ["namespaces", ns, plural] => (Some(ns.to_string()), *plural, None),
        ["namespaces", ns, plural, name] => (Some(ns.to_string()), *plural, Some(name.to_string())),
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(name.to_string())),
        _ => return None,
    };
    let resource = RESOURCES
        .iter()
        .find(|r| r.plural == plural && r.api_version == api_version)?;
    if resource.namespaced && namespace.is_none() && name.is_some() {
        return None;
    }
    if !resource.namespaced && namespace.is_some() {
        return None;
    }
    Some(Target {
        resource,
        namespace,
        name,
    })
}

/// The namespace key under which an object is stored ("" for cluster-scoped ones).
fn ns_key(target: &Target) -> String {
    target.namespace.clone().unwrap_or_default()
}

fn status(code: u16, reason: &str, message: String, details: Option<Value>) -> (u16, Value) {
    let mut body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    });
    if let Some(details) = details {
        body["details"] = details;
    }
    (code, body)
}

fn not_found(plural: &str, name: &str) -> (u16, Value) {
    status(
        404,
        "NotFound",
        format!("{plural} \"{name}\" not found"),
        Some(json!({"name": name, "kind": plural})),
    )
}

fn invalid(kind: &str, name: &str, errors: &[String]) -> (u16, Value) {
    status(
        422,
        "Invalid",
        format!("{kind} \"{name}\" is invalid: {}", errors.join(", ")),
        Some(json!({"name": name, "kind": kind})),
    )
}

/// Answers a request for a built-in resource; None when the path is not one.
pub(super) fn handle(state: &mut State, req: &super::http::Request) -> Option<(u16, Value)> {
    let target = target(&req.path)?;
    let plural = target.resource.plural;
    let body = || serde_json::from_slice::<Value>(&req.body);
    let answer = match (req.method.as_str(), &target.name) {
        ("GET", None) => list(state, &target),
        ("GET", Some(name)) => {
            match state
                .objects
                .get(&(plural.into(), ns_key(&target), name.clone()))
            {
                Some(obj) => (200, obj.clone()),
                None => not_found(plural, name),
            }
        }
        ("POST", None) => match body() {
            Ok(obj) => create(state, &target, obj),
            Err(e) => status(400, "BadRequest", format!("invalid JSON: {e}"), None),
        },
        ("PUT", Some(name)) => match body() {
            Ok(obj) => update(state, &target, name, obj),
            Err(e) => status(400, "BadRequest", format!("invalid JSON: {e}"), None),
        },
        ("DELETE", Some(name)) => match remove(state, plural, &ns_key(&target), name) {
            Some(obj) => (200, obj),
            None => not_found(plural, name),
        },
        (method, _) => status(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported here"),
            None,
        ),
    };
    Some(answer)
}

fn list(state: &State, target: &Target) -> (u16, Value) {
    let plural = target.resource.plural;
    let items: Vec<Value> = state
        .objects
        .iter()
        .filter(|((p, ns, _), _)| {
            p == plural && target.namespace.as_ref().is_none_or(|want| want == ns)
        })
        .map(|(_, v)| v.clone())
        .collect();
    (
        200,
        json!({
            "apiVersion": target.resource.api_version,
            "kind": format!("{}List", target.resource.kind),
            "metadata": {"resourceVersion": state.revision.to_string()},
            "items": items,
        }),
    )
}

/// Checks common to create and update; the errors found.
fn admit(target: &Target, obj: &Value) -> Vec<String> {
    let resource = target.resource;
    let mut errors = Vec::new();
    if obj["apiVersion"] != resource.api_version {
        errors.push(format!("apiVersion: Invalid value: {}", obj["apiVersion"]));
    }
    if obj["kind"] != resource.kind {
        errors.push(format!("kind: Invalid value: {}", obj["kind"]));
    }
    if resource.plural == "events" {
        let regarding = &obj["regarding"];
        if regarding["namespace"].as_str() != target.namespace.as_deref() {
            errors
                .push("regarding.namespace: Invalid value: does not match event.namespace".into());
        }
        if regarding["kind"].as_str().is_none_or(str::is_empty)
            || regarding["name"].as_str().is_none_or(str::is_empty)
        {
            errors.push("regarding: Required value: kind and name".into());
        }
    }
    errors
}

fn create(state: &mut State, target: &Target, mut obj: Value) -> (u16, Value) {
    let resource = target.resource;
    if resource.namespaced && target.namespace.is_none() {
        return status(
            405,
            "MethodNotAllowed",
            "create needs a namespace".into(),
            None,
        );
    }
    if let Some(body_ns) = obj["metadata"]["namespace"].as_str() {
        if Some(body_ns) != target.namespace.as_deref() {
            return status(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request".into(),
                None,
            );
        }
    }
    if obj["metadata"]["name"].as_str().is_none_or(str::is_empty) {
        if let Some(prefix) = obj["metadata"]["generateName"].as_str() {
            state.uids += 1;
            obj["metadata"]["name"] = json!(format!("{prefix}{:05x}", state.uids));
        }
    }
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut errors = admit(target, &obj);
    if !is_dns_subdomain(&name) {
        errors.push(format!("metadata.name: Invalid value: {name:?}"));
    }
    if obj["metadata"]
        .get("resourceVersion")
        .is_some_and(|v| !v.is_null())
    {
        errors.push("metadata.resourceVersion: Invalid value: must not be set on create".into());
    }
    if !errors.is_empty() {
        return invalid(resource.kind, &name, &errors);
    }
    let key = (resource.plural.to_string(), ns_key(target), name.clone());
    if state.objects.contains_key(&key) {
        return status(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", resource.plural),
            Some(json!({"name": name, "kind": resource.plural})),
        );
    }
    (201, insert(state, resource.plural, &ns_key(target), obj))
}

fn update(state: &mut State, target: &Target, name: &str, obj: Value) -> (u16, Value) {
    let resource = target.resource;
    let key = (
        resource.plural.to_string(),
        ns_key(target),
        name.to_string(),
    );
    let Some(current) = state.objects.get(&key) else {
        return not_found(resource.plural, name);
    };
    let mut errors = admit(target, &obj);
    if obj["metadata"]["name"].as_str() != Some(name) {
        errors.push("metadata.name: does not match the name on the URL".into());
    }
    match obj["metadata"]["resourceVersion"].as_str() {
        None => errors.push("metadata.resourceVersion: Invalid value: must be specified for an update".into()),
        Some(rv) if Some(rv) != current["metadata"]["resourceVersion"].as_str() => {
            return status(
                409,
                "Conflict",
                format!("Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again", resource.plural),
                Some(json!({"name": name, "kind": resource.plural})),
            )
        }
        Some(_) => {}
    }
    if !errors.is_empty() {
        return invalid(resource.kind, name, &errors);
    }
    (200, replace(state, resource.plural, &ns_key(target), obj))
}

/// Stores a new object: uid, resourceVersion, creationTimestamp; records ADDED.
fn insert(state: &mut State, plural: &str, ns: &str, mut obj: Value) -> Value {
    state.revision += 1;
    state.uids += 1;
    let meta = &mut obj["metadata"];
    if !ns.is_empty() {
        meta["namespace"] = json!(ns);
    }
    meta["resourceVersion"] = json!(state.revision.to_string());
    if meta["uid"].as_str().is_none_or(str::is_empty) {
        meta["uid"] = json!(format!("00000000-0000-4000-9000-{:012x}", state.uids));
    }
    meta["creationTimestamp"] = json!(now_rfc3339());
    let name = meta["name"].as_str().unwrap_or_default().to_string();
    state
        .objects
        .insert((plural.into(), ns.into(), name), obj.clone());
    super::watch::record(state, "ADDED", plural, ns, &obj);
    obj
}

/// Replaces an existing object, keeping its identity; records MODIFIED.
fn replace(state: &mut State, plural: &str, ns: &str, mut obj: Value) -> Value {
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let key = (plural.to_string(), ns.to_string(), name);
    if let Some(current) = state.objects.get(&key) {
        obj["metadata"]["uid"] = current["metadata"]["uid"].clone();
        obj["metadata"]["creationTimestamp"] = current["metadata"]["creationTimestamp"].clone();
    }
    state.revision += 1;
    obj["metadata"]["resourceVersion"] = json!(state.revision.to_string());
    state.objects.insert(key, obj.clone());
    super::watch::record(state, "MODIFIED", plural, ns, &obj);
    obj
}

/// Removes an object at once (no graceful deletion); records DELETED.
fn remove(state: &mut State, plural: &str, ns: &str, name: &str) -> Option<Value> {
    let mut obj = state
        .objects
        .remove(&(plural.into(), ns.into(), name.into()))?;
    state.revision += 1;
    obj["metadata"]["resourceVersion"] = json!(state.revision.to_string());
    super::watch::record(state, "DELETED", plural, ns, &obj);
    Some(obj)
}

/// What tests do to the cluster, as kubelet, the scheduler or an operator would.
impl FakeApiServer {
    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut state = self.shared.state.lock().unwrap();
        f(&mut state)
    }

    /// Creates pod `ns/name` in `phase`; returns its UID.
    pub fn add_pod(&self, ns: &str, name: &str, phase: &str) -> String {
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"containers": [{"name": "c", "image": "pause"}], "nodeName": "node-a"},
            "status": {"phase": phase},
        });
        self.with_state(|state| {
            let created = insert(state, "pods", ns, pod);
            created["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
    }

    /// Creates pod `ns/name` with a given UID (what a runtime recorded as K8S_POD_UID).
    pub fn add_pod_with_uid(&self, ns: &str, name: &str, uid: &str, phase: &str) {
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "uid": uid},
            "spec": {"containers": [{"name": "c", "image": "pause"}]},
            "status": {"phase": phase},
        });
        self.with_state(|state| insert(state, "pods", ns, pod));
    }

    /// Moves pod `ns/name` to `phase`.
    pub fn set_pod_phase(&self, ns: &str, name: &str, phase: &str) {
        self.with_state(|state| {
            let key = ("pods".to_string(), ns.to_string(), name.to_string());
            let mut pod = state.objects.get(&key).cloned().expect("pod exists");
            pod["status"]["phase"] = json!(phase);
            replace(state, "pods", ns, pod);
        });
    }

    /// Sets an object's creationTimestamp (RFC 3339): an object as old as a test needs.
    pub fn set_created(&self, plural: &str, ns: &str, name: &str, at: &str) {
        self.with_state(|state| {
            let key = (plural.to_string(), ns.to_string(), name.to_string());
            let object = state.objects.get_mut(&key).expect("the object exists");
            object["metadata"]["creationTimestamp"] = json!(at);
        });
    }

    /// Deletes any built-in object at once (a pod whose kubelet has finished with it).
    pub fn delete_now(&self, plural: &str, ns: &str, name: &str) -> bool {
        self.with_state(|state| remove(state, plural, ns, name).is_some())
    }

    pub fn add_node(&self, name: &str) {
        let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}});
        self.with_state(|state| insert(state, "nodes", "", node));
    }

    pub fn remove_node(&self, name: &str) -> bool {
        self.delete_now("nodes", "", name)
    }

    /// Creates a NetworkAttachmentDefinition whose `spec.config` is `config` as a string.
    pub fn add_nad(&self, ns: &str, name: &str, config: &Value) {
        let nad = json!({
            "apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"config": config.to_string()},
        });
        self.with_state(|state| insert(state, "network-attachment-definitions", ns, nad));
    }

    /// Creates or replaces config map `ns/name` with `data`.
    pub fn put_configmap(&self, ns: &str, name: &str, data: Value) {
        let cm = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": ns},
            "data": data,
        });
        self.with_state(|state| {
            let key = ("configmaps".to_string(), ns.to_string(), name.to_string());
            match state.objects.get(&key) {
                Some(_) => replace(state, "configmaps", ns, cm),
                None => insert(state, "configmaps", ns, cm),
            }
        });
    }
}

impl FakeApiServer {
    /// Deletes pod `ns/name` and creates it again with `uid` in one step, as a StatefulSet
    /// controller does faster than anyone can look.
    pub fn recreate_pod(&self, ns: &str, name: &str, uid: &str, phase: &str) {
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "uid": uid},
            "spec": {"containers": [{"name": "c", "image": "pause"}]},
            "status": {"phase": phase},
        });
        self.with_state(|state| {
            remove(state, "pods", ns, name);
            insert(state, "pods", ns, pod);
        });
    }
}
