//! `whereabouts crds`: the CustomResourceDefinitions generated from the Rust types in
//! [`crate::k8s::crd`], printed or written as the YAML files `deploy/` and the Helm chart ship.
//!
//! kube's derive gives the schema; [`definitions`] then adjusts the few places where its defaults
//! differ from the wire contract of the upstream CRDs, so that objects written by either
//! implementation are accepted and read by the other (see the comments in `upstream_parity`).

use std::path::PathBuf;

use anyhow::Context as _;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps,
};
use kube::CustomResourceExt;

use crate::k8s::crd::{IPPool, NodeSlicePool, OverlappingRangeIPReservation};

/// The command that regenerates the committed files; quoted in their header.
pub const REGENERATE: &str =
    "whereabouts crds --output-dir deploy --output-dir deploy/helm/whereabouts/crds";

#[derive(clap::Args, Debug)]
pub struct CrdsArgs {
    /// Write one file per CRD (`<group>_<plural>.yaml`) into this directory instead of printing
    /// all of them to stdout. May be given several times.
    #[arg(long = "output-dir", value_name = "DIR")]
    pub output_dirs: Vec<PathBuf>,
}

/// One CRD together with the file name it is committed under.
pub struct CrdFile {
    /// `whereabouts.cni.cncf.io_<plural>.yaml`, the names upstream uses.
    pub file_name: String,
    pub crd: CustomResourceDefinition,
}

/// Whether upstream's root schema lists `spec` as required: it does for
/// OverlappingRangeIPReservation only (the API server accepts IPPools and NodeSlicePools without
/// a spec), while kube's derive always requires it.
#[derive(Clone, Copy)]
enum SpecRequired {
    Yes,
    No,
}

/// The three CRDs, in a stable order.
pub fn definitions() -> Vec<CrdFile> {
    [
        upstream_parity(IPPool::crd(), SpecRequired::No),
        upstream_parity(OverlappingRangeIPReservation::crd(), SpecRequired::Yes),
        upstream_parity(NodeSlicePool::crd(), SpecRequired::No),
    ]
    .into_iter()
    .map(|crd| CrdFile {
        file_name: format!("{}_{}.yaml", crd.spec.group, crd.spec.names.plural),
        crd,
    })
    .collect()
}

fn upstream_parity(
    mut crd: CustomResourceDefinition,
    spec_required: SpecRequired,
) -> CustomResourceDefinition {
    let names = &mut crd.spec.names;
    // The API server would default it to the same value; upstream states it, and clients that
    // read the CRD (kubectl explain, generators) then see identical names.
    names.list_kind = Some(format!("{}List", names.kind));

    for version in &mut crd.spec.versions {
        // kube adds a status subresource whenever the type has a status. Upstream has none, and
        // its node-slice controller creates NodeSlicePools with the status filled in through the
        // main resource: with the subresource the API server would silently drop that status.
        version.subresources = None;

        let Some(root) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        else {
            continue;
        };
        // schemars names the Rust type; upstream has no title and clients do not use it.
        root.title = None;
        let properties = root.properties.get_or_insert_with(Default::default);
        // The API server validates these itself; upstream lists them, and so does `kubectl explain`.
        properties.insert("apiVersion".into(), string_schema(API_VERSION_DOC));
        properties.insert("kind".into(), string_schema(KIND_DOC));
        properties.insert(
            "metadata".into(),
            JSONSchemaProps {
                type_: Some("object".into()),
                ..Default::default()
            },
        );
        // Upstream's Go types serialise status as a plain struct, never null.
        if let Some(status) = properties.get_mut("status") {
            status.nullable = None;
        }
        if let SpecRequired::No = spec_required {
            if let Some(required) = root.required.as_mut() {
                required.retain(|field| field != "spec");
                if required.is_empty() {
                    root.required = None;
                }
            }
        }
    }
    crd
}

const API_VERSION_DOC: &str =
    "APIVersion defines the versioned schema of this representation of an object.";
const KIND_DOC: &str =
    "Kind is a string value representing the REST resource this object represents.";

fn string_schema(description: &str) -> JSONSchemaProps {
    JSONSchemaProps {
        description: Some(description.into()),
        type_: Some("string".into()),
        ..Default::default()
    }
}

/// Errors turning a CRD into YAML.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("cannot convert the CRD to JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot write the CRD as YAML: {0}")]
    Yaml(#[from] serde_saphyr::SerializeError),
}

/// One CRD as a YAML document, with a header naming the command that regenerates it.
pub fn render(file: &CrdFile) -> Result<String, RenderError> {
    // Through serde_json::Value so that keys come out sorted and the output is stable.
    let value = serde_json::to_value(&file.crd)?;
    let body = serde_saphyr::to_string(&value)?;
    Ok(format!(
        "# Generated from the Rust types in src/k8s/crd.rs; do not edit.\n# Regenerate with: {REGENERATE}\n{body}"
    ))
}

pub fn run(args: CrdsArgs) -> anyhow::Result<()> {
    let files = definitions();
    if args.output_dirs.is_empty() {
        let mut out = String::new();
        for file in &files {
            out.push_str("---\n");
            out.push_str(&render(file)?);
        }
        print!("{out}");
        return Ok(());
    }
    for dir in &args.output_dirs {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for file in &files {
            let path = dir.join(&file.file_name);
            std::fs::write(&path, render(file)?)
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}
