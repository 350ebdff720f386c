//! The engine as a library, in-process: asyncore's `loop(timeout, count)`
//! with a real plugin and real sockets, no daemon and no gRPC.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    time::{Duration, Instant},
};

use asyncore_engine::{Engine, plugin_host};
use asyncore_tests::{on_thread_within, patience, plugin_library};

#[test]
fn run_loop_serves_until_the_map_is_empty() {
    // On a thread of its own: a loop that never ends fails the test.
    on_thread_within("the engine's loops", || {
        let mut engine = Engine::new().unwrap();
        engine.add_plugin(plugin_host::load(&plugin_library("asyncore_plugin_echo")).unwrap(), true).unwrap();
        let listener = engine.start_listener("127.0.0.1:0".parse().unwrap(), "echo", BTreeMap::new()).unwrap();
        assert_eq!(engine.n_channels(), 1);

        assert_eq!(round_trip(&mut engine, listener.address, b"round trip"), b"round trip");
        assert!(engine.loop_stats().handler_calls >= 2, "accepted and read");

        // Without `count`, the loop runs until the map is empty: stopping
        // the listener and closing its channels ends it.
        engine.stop_listener(listener.id, true).unwrap();
        engine.run_loop(Some(Duration::from_millis(10)), None).unwrap();
        assert_eq!(engine.n_channels(), 0);
    });
}

/// Sends `message` to `address` from a client thread and reads as many
/// bytes back, running the engine's loop a few passes at a time
/// (`count` bounds them: a listener keeps the map non-empty) until the
/// client is done, for at most the patience.
pub(crate) fn round_trip(engine: &mut Engine, address: std::net::SocketAddr, message: &[u8]) -> Vec<u8> {
    let message = message.to_vec();
    let client = std::thread::spawn(move || {
        let mut stream = asyncore_tests::connect(address);
        stream.write_all(&message).unwrap();
        let mut back = vec![0u8; message.len()];
        stream.read_exact(&mut back).unwrap();
        back
    });
    let started = Instant::now();
    while !client.is_finished() {
        assert!(started.elapsed() < patience(), "no round trip within {:?}", patience());
        engine.run_loop(Some(Duration::from_millis(10)), Some(5)).unwrap();
    }
    client.join().unwrap()
}
