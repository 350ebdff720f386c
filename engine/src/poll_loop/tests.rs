//! The whole loop with a plugin (a hand-written one, `test_plugin`) and real
//! sockets on loopback: what only shows with everything together.

use std::{io::Write, net::TcpStream, time::Duration};

use crate::{
    Engine, EngineHandle,
    command::{Command, CommandError, ListenerInfo},
    plugin_host::{self, LoadedPlugin},
    test_plugin,
};

fn engine_with_listener(config: &[(&str, &str)]) -> (Engine, ListenerInfo) {
    let mut engine = Engine::new().unwrap();
    engine.add_plugin(plugin_host::in_process(&test_plugin::DESCRIPTOR).unwrap(), true).unwrap();
    let config = config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let listener = engine.start_listener("127.0.0.1:0".parse().unwrap(), "reader", config).unwrap();
    (engine, listener)
}

/// Runs passes until `done`, failing after a bounded number of them.
#[track_caller]
fn run_until(engine: &mut Engine, what: &str, done: impl Fn(&Engine) -> bool) {
    for _ in 0..1000 {
        if done(engine) {
            return;
        }
        engine.pass(Some(Duration::from_millis(10))).unwrap();
    }
    panic!("{what}: still not the case after 1000 passes");
}

#[test]
fn stopping_a_stopped_listener_answers_listener_stopped() {
    let (mut engine, listener) = engine_with_listener(&[]);
    let stopped = engine.stop_listener(listener.id, false).unwrap();
    assert!(!stopped.listening);
    assert_eq!(engine.n_channels(), 0);

    let again = engine.stop_listener(listener.id, true).unwrap_err();
    assert!(matches!(again, CommandError::ListenerStopped(id) if id == listener.id), "{again:?}");
    assert_eq!(again.to_string(), format!("listener {} is already stopped", listener.id));
    assert!(matches!(engine.stop_listener(999, false), Err(CommandError::NoListener(999))));
}

#[test]
fn an_idle_timeout_too_long_for_the_clock_never_fires() {
    // 10^19 seconds is a valid Duration but lies past what an Instant can
    // hold: its deadline used to overflow, a panic on the poll thread at
    // the first accept.
    let (mut engine, listener) = engine_with_listener(&[("idle_timeout", "10000000000000000000")]);
    let _client = TcpStream::connect(listener.address).unwrap();
    run_until(&mut engine, "the connection is accepted", |engine| engine.n_channels() == 2);
    engine.pass(Some(Duration::ZERO)).unwrap();
    assert_eq!(engine.n_channels(), 2, "still open");
    assert_eq!(engine.core.timers.len(), 0, "no idle check is armed for never");
}

#[test]
fn a_timer_re_armed_on_every_message_does_not_pile_up_and_leaves_with_its_channel() {
    let (mut engine, listener) = engine_with_listener(&[]);
    let mut client = TcpStream::connect(listener.address).unwrap();
    run_until(&mut engine, "the connection is accepted", |engine| engine.n_channels() == 2);
    let reads_before = engine.loop_stats().handler_calls;
    for message in 1..=2000 {
        client.write_all(b"x").unwrap();
        run_until(&mut engine, "the message is read", |engine| {
            engine.loop_stats().handler_calls >= reads_before + message
        });
    }
    // The plugin cancels its hour-long timer and arms another on every
    // message: cancelled ones used to stay until due, an hour later.
    assert_eq!(engine.core.timers.len(), 1);

    drop(client);
    run_until(&mut engine, "the connection is closed", |engine| engine.n_channels() == 1);
    assert_eq!(engine.core.timers.len(), 0, "a closed channel's timers leave with it");
}

#[test]
fn plugins_and_commands_cross_to_the_loop_thread() {
    fn assert_send<T: Send>() {}
    assert_send::<LoadedPlugin>();
    assert_send::<Command>();
    assert_send::<EngineHandle>();
}
