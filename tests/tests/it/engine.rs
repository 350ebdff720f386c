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

        let client = std::thread::spawn(move || {
            let mut stream = asyncore_tests::connect(listener.address);
            stream.write_all(b"round trip").unwrap();
            let mut back = [0u8; 10];
            stream.read_exact(&mut back).unwrap();
            back
        });
        // `count` bounds the passes: the listener keeps the map non-empty.
        let started = Instant::now();
        while !client.is_finished() {
            assert!(started.elapsed() < patience(), "no round trip within {:?}", patience());
            engine.run_loop(Some(Duration::from_millis(10)), Some(5)).unwrap();
        }
        assert_eq!(&client.join().unwrap(), b"round trip");
        assert!(engine.loop_stats().handler_calls >= 2, "accepted and read");

        // Without `count`, the loop runs until the map is empty: stopping
        // the listener and closing its channels ends it.
        engine.stop_listener(listener.id, true).unwrap();
        engine.run_loop(Some(Duration::from_millis(10)), None).unwrap();
        assert_eq!(engine.n_channels(), 0);
    });
}
