//! ABI versioning: a plugin of the first version's (1.0) tables loads and
//! serves, its absent fields treated as absent; a descriptor smaller than
//! 1.0's is refused naming both sizes. On the real engine, with the real
//! loader and real sockets.

use std::collections::BTreeMap;

use asyncore_engine::{Engine, plugin_host};
use asyncore_tests::plugin_library;

#[test]
fn a_plugin_of_abi_1_0_loads_and_serves() {
    let plugin = plugin_host::load(&plugin_library("asyncore_fixture_abi_v1_0")).expect("abi 1.0 loads");
    assert_eq!(plugin.name(), "old_echo");
    let mut engine = Engine::new().unwrap();
    let info = engine.add_plugin(plugin, true).unwrap();
    assert_eq!(info.headline().abi_version, (1, 0), "reported as the version it was built for");
    let listener = engine.start_listener("127.0.0.1:0".parse().unwrap(), "old_echo", BTreeMap::new()).unwrap();

    assert_eq!(crate::engine::round_trip(&mut engine, listener.address, b"from the past"), b"from the past");

    // A second generation of it: it imports no state (its descriptor has
    // no `import_state`), so nothing is handed over and the first keeps its
    // channels.
    let again = plugin_host::load(&plugin_library("asyncore_fixture_abi_v1_0")).unwrap();
    let info = engine.add_plugin(again, true).unwrap();
    assert_eq!(info.current_generation, 2);
}

#[test]
fn a_descriptor_smaller_than_abi_1_0_is_refused_naming_both_sizes() {
    let error = plugin_host::load(&plugin_library("asyncore_fixture_abi_short")).expect_err("refused");
    let message = error.to_string();
    let minimum = asyncore_engine::abi::v1_0::PLUGIN_DESCRIPTOR_SIZE;
    assert!(message.contains("24 bytes"), "{message}");
    assert!(message.contains(&format!("{minimum} bytes of abi 1.0")), "{message}");
}
