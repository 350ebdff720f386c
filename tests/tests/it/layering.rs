//! The layers are crates, and the crate graph keeps them apart: the engine
//! knows no protobuf, serde or gRPC; the ABI crate depends on nothing; the
//! SDK only on the ABI; plugins only on the SDK; the daemon reaches sockets,
//! the poller and the loader only through the engine. Checked on the real
//! graph (`cargo metadata`), so a new dependency that breaks a layer fails
//! here.

use std::collections::{BTreeMap, BTreeSet};

use asyncore_tests::output_within;
use serde_json::Value;

/// The workspace's resolved graph: package name to the names of its direct
/// normal (non-dev, non-build) dependencies.
struct Graph {
    direct: BTreeMap<String, BTreeSet<String>>,
}

impl Graph {
    fn load() -> Graph {
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
        // Only this platform's graph: the others' crates need not be
        // downloaded, and only this one is built here.
        let rustc = output_within(std::process::Command::new("rustc").arg("-vV"));
        let rustc = String::from_utf8_lossy(&rustc.stdout);
        let host = rustc.lines().find_map(|l| l.strip_prefix("host: ")).expect("rustc -vV names its host");
        let output = output_within(
            std::process::Command::new(env!("CARGO"))
                .args(["metadata", "--format-version", "1", "--offline", "--filter-platform", host])
                .args(["--manifest-path", manifest]),
        );
        assert!(output.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&output.stderr));
        let metadata: Value = serde_json::from_slice(&output.stdout).expect("cargo metadata json");
        let name_of: BTreeMap<&str, &str> = metadata["packages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
            .collect();
        let mut direct = BTreeMap::new();
        for node in metadata["resolve"]["nodes"].as_array().unwrap() {
            let normal: BTreeSet<String> = node["deps"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|dep| dep["dep_kinds"].as_array().unwrap().iter().any(|k| k["kind"].is_null()))
                .map(|dep| name_of[dep["pkg"].as_str().unwrap()].to_string())
                .collect();
            direct.insert(name_of[node["id"].as_str().unwrap()].to_string(), normal);
        }
        Graph { direct }
    }

    #[track_caller]
    fn direct(&self, package: &str) -> &BTreeSet<String> {
        self.direct.get(package).unwrap_or_else(|| panic!("no package {package} in the workspace"))
    }

    /// Every package `package` depends on at build time for its library
    /// and binaries, transitively.
    fn transitive(&self, package: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![package.to_string()];
        while let Some(next) = todo.pop() {
            for dep in self.direct(&next) {
                if seen.insert(dep.clone()) {
                    todo.push(dep.clone());
                }
            }
        }
        seen
    }
}

#[test]
fn the_crate_graph_keeps_the_layers_apart() {
    let graph = Graph::load();

    assert!(graph.direct("asyncore-abi").is_empty(), "the abi crate has no dependencies");
    assert_eq!(graph.transitive("asyncore-sdk"), BTreeSet::from(["asyncore-abi".to_string()]), "sdk: abi only");

    let engine = graph.transitive("asyncore-engine");
    for banned in ["tonic", "prost", "prost-types", "serde", "serde_json", "asyncore-proto", "asyncore-sdk", "hyper"] {
        assert!(!engine.contains(banned), "the engine must not depend on {banned}");
    }

    let plugins: Vec<&String> = graph.direct.keys().filter(|name| name.starts_with("asyncore-plugin-")).collect();
    assert!(plugins.len() >= 5, "plugins found: {plugins:?}");
    for plugin in plugins {
        assert_eq!(
            graph.direct(plugin),
            &BTreeSet::from(["asyncore-sdk".to_string()]),
            "{plugin} depends on the SDK only"
        );
    }

    // The daemon reaches sockets, the poller and the loader only through
    // the engine; the CLI talks to the daemon only through the proto crate.
    let daemon = graph.direct("asyncored");
    for engine_only in ["polling", "socket2", "libloading", "asyncore-sdk", "asyncore-abi"] {
        assert!(!daemon.contains(engine_only), "the daemon must not depend on {engine_only} directly");
    }
    let ctl = graph.transitive("asyncorectl");
    for banned in ["asyncore-engine", "asyncored", "asyncore-sdk", "libloading", "polling"] {
        assert!(!ctl.contains(banned), "the CLI must not depend on {banned}");
    }
    assert!(graph.direct("asyncore-testing").contains("asyncore-engine"), "plugin tests run on the real engine");
}
