//! Where Services and EndpointSlices come from. Every source produces the
//! same thing: a `Snapshot` of `k8s-openapi` objects, which the model turns
//! into desired state.
//!
//! This module holds the manifest-directory source: YAML or JSON files,
//! several documents per file, `List` objects included. The directory is
//! re-read when a file is added, changed or removed.
use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::Deserialize;

/// The objects a source currently holds.
#[derive(Clone, Debug, Default)]
/// Objects are shared, not copied: a snapshot of a large cluster costs a
/// pointer per object.
pub struct Snapshot {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    /// This node, when the source knows it (reserved for topology rules).
    pub node: Option<Arc<Node>>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} document {doc}: {reason}")]
    Document { path: PathBuf, doc: usize, reason: String },
}

/// A directory of manifests.
pub struct ManifestDir {
    dir: PathBuf,
}

/// Identity of the directory's content: names, sizes, modification times.
pub type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

fn is_manifest(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn files(&self) -> Result<Vec<PathBuf>, Error> {
        let entries = fs::read_dir(&self.dir).map_err(|source| Error::Io { path: self.dir.clone(), source })?;
        let mut files: Vec<PathBuf> =
            entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| is_manifest(p)).collect();
        files.sort();
        Ok(files)
    }

    /// Cheap check for changes: compare with the previous fingerprint.
    pub fn fingerprint(&self) -> Result<Fingerprint, Error> {
        Ok(self
            .files()?
            .into_iter()
            .map(|p| {
                let meta = fs::metadata(&p).ok();
                let size = meta.as_ref().map_or(0, fs::Metadata::len);
                let mtime = meta.and_then(|m| m.modified().ok());
                (p, size, mtime)
            })
            .collect())
    }

    /// Read every manifest. Bad documents are returned as errors beside the
    /// snapshot of everything that parsed.
    pub fn read(&self) -> Result<(Snapshot, Vec<Error>), Error> {
        let mut snap = Snapshot::default();
        let mut errors = Vec::new();
        for path in self.files()? {
            match fs::read_to_string(&path) {
                Ok(text) => parse_documents(&path, &text, &mut snap, &mut errors),
                // The file vanished between listing and reading: the next
                // pass sees the directory without it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => errors.push(Error::Io { path, source }),
            }
        }
        Ok((snap, errors))
    }
}

/// Parse a multi-document YAML (or JSON) text into `snap`.
pub fn parse_documents(path: &Path, text: &str, snap: &mut Snapshot, errors: &mut Vec<Error>) {
    for (doc, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let err = |reason: String| Error::Document { path: path.to_owned(), doc, reason };
        match serde_yaml::Value::deserialize(de) {
            Ok(serde_yaml::Value::Null) => {}
            Ok(value) => match serde_json::to_value(value) {
                Ok(json) => {
                    if let Err(reason) = add_object(json, snap) {
                        errors.push(err(reason));
                    }
                }
                Err(e) => errors.push(err(e.to_string())),
            },
            Err(e) => {
                errors.push(err(format!("not valid YAML: {e}")));
                // The YAML stream cannot be resynchronised after a syntax error.
                break;
            }
        }
    }
}

fn add_object(json: serde_json::Value, snap: &mut Snapshot) -> Result<(), String> {
    let api_version = json.get("apiVersion").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    let kind = json.get("kind").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    let name = json.pointer("/metadata/name").and_then(|v| v.as_str()).unwrap_or("<unnamed>").to_owned();
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => {
            let svc = serde_json::from_value(json).map_err(|e| format!("Service {name}: {e}"))?;
            snap.services.push(Arc::new(svc));
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let slice = serde_json::from_value(json).map_err(|e| format!("EndpointSlice {name}: {e}"))?;
            snap.slices.push(Arc::new(slice));
        }
        (_, kind) if kind == "List" || kind.ends_with("List") => {
            let items = json.get("items").and_then(|v| v.as_array()).cloned().unwrap_or_default();
            let mut failed = Vec::new();
            for (i, item) in items.into_iter().enumerate() {
                if let Err(e) = add_object(item, snap) {
                    failed.push(format!("items[{i}]: {e}"));
                }
            }
            if !failed.is_empty() {
                return Err(failed.join("; "));
            }
        }
        ("", _) | (_, "") => return Err("not a Kubernetes object (no apiVersion or kind)".into()),
        // Other kinds (Deployments, ConfigMaps, ...) are not ours.
        _ => log::debug!("ignoring {api_version} {kind} {name}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Snapshot, Vec<Error>) {
        let mut snap = Snapshot::default();
        let mut errors = Vec::new();
        parse_documents(Path::new("x.yaml"), text, &mut snap, &mut errors);
        (snap, errors)
    }

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec: {clusterIP: 198.19.0.10, ports: [{port: 80}]}\n";
    const SLICE: &str = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: [{addresses: [198.18.2.2]}]\nports: [{port: 8080}]\n";

    #[test]
    fn reads_multi_document_files_and_lists() {
        let text = format!(
            "{SVC}---\n{SLICE}---\n# empty\n---\napiVersion: v1\nkind: List\nitems:\n- {{apiVersion: v1, kind: Service, metadata: {{name: other}}, spec: {{clusterIP: 198.19.0.11}}}}\n"
        );
        let (snap, errors) = parse(&text);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(snap.services.len(), 2);
        assert_eq!(snap.slices.len(), 1);
    }

    #[test]
    fn a_bad_document_is_reported_with_file_and_index_and_the_rest_is_kept() {
        let text = format!(
            "{SVC}---\napiVersion: v1\nkind: Service\nmetadata: {{name: bad}}\nspec: {{ports: 7}}\n---\n{SLICE}---\nkind: Deployment\napiVersion: apps/v1\n---\nfoo: bar\n"
        );
        let (snap, errors) = parse(&text);
        assert_eq!(snap.services.len(), 1);
        assert_eq!(snap.slices.len(), 1, "documents after the bad one still count");
        assert_eq!(errors.len(), 2, "{errors:?}");
        let first = errors[0].to_string();
        assert!(first.contains("x.yaml document 1") && first.contains("Service bad"), "{first}");
        assert!(errors[1].to_string().contains("not a Kubernetes object"), "{}", errors[1]);
    }

    #[test]
    fn invalid_yaml_is_an_error_not_an_empty_file() {
        let (_, errors) = parse("apiVersion: v1\nkind: [unclosed\n");
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("not valid YAML"));
    }
}
