//! Architecture rules from DEVELOPERS.md, checked on the manifests:
//! codecs and storage depend on no other workspace crate, storage never
//! sees AMQP, and the gateway (router included) never sees fjall.

use std::path::PathBuf;

fn manifest(krate: &str) -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::read_to_string(root.join(krate).join("Cargo.toml")).expect("Cargo.toml")
}

/// Names of the crates a manifest depends on (any dependency table).
fn deps(krate: &str) -> Vec<String> {
    let text = manifest(krate);
    let mut out = Vec::new();
    let mut in_deps = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_deps = line.contains("dependencies");
            continue;
        }
        if in_deps {
            if let Some((name, _)) = line.split_once(['=', '.']) {
                if !name.trim().is_empty() && !name.starts_with('#') {
                    out.push(name.trim().to_string());
                }
            }
        }
    }
    out
}

#[test]
fn codecs_and_storage_depend_on_no_workspace_crate() {
    for krate in ["codecs", "storage"] {
        let d = deps(krate);
        assert!(d.iter().any(|n| n == "bytes"), "the manifest parser found {d:?} in {krate}");
        assert!(d.iter().all(|n| !n.starts_with("sluice-")), "{krate} depends on {d:?}");
    }
}

#[test]
fn gateway_never_sees_fjall_or_storage() {
    let d = deps("gateway");
    assert!(!d.iter().any(|n| n == "fjall" || n == "sluice-storage"), "gateway depends on {d:?}");
    assert!(d.iter().any(|n| n == "sluice-cluster"), "the gateway reaches queues through the cluster crate");
}

#[test]
fn storage_never_sees_amqp() {
    let d = deps("storage");
    assert!(!d.iter().any(|n| n.contains("codecs") || n.contains("lapin") || n.contains("amq")), "storage depends on {d:?}");
}
