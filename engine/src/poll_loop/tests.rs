//! The whole loop with a plugin (a hand-written one, `test_plugin`) and real
//! sockets on loopback: what only shows with everything together.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use crate::{
    Engine, EngineHandle,
    command::{ChannelStats, Command, CommandError, GenerationState, ListenerInfo, PluginInfo, StatsFilter},
    ids::ListenerId,
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
fn output_written_a_pass_after_a_stats_reader_asked_is_reported_to_it_next_time() {
    let (mut engine, listener) = engine_with_listener(&[]);
    let mut client = TcpStream::connect(listener.address).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    run_until(&mut engine, "the connection is accepted", |engine| engine.n_channels() == 2);
    let every = StatsFilter::new(None, []);
    let first = engine.core.stats_changes(&every, 0, 0);
    assert!(first.complete, "a first request takes a full snapshot");

    // The reply is queued while the request is read, and written in the
    // next pass: a reader that asks in between sees it unwritten.
    let calls = engine.loop_stats().handler_calls;
    client.write_all(b"!ping").unwrap();
    run_until(&mut engine, "the request is read", |engine| engine.loop_stats().handler_calls > calls);
    let between = engine.core.stats_changes(&every, 0, first.epoch);
    let figures = |snapshot: &crate::command::StatsSnapshot| -> Vec<(u64, u64)> {
        snapshot.channels.iter().map(|s: &ChannelStats| (s.counters.bytes_in, s.counters.bytes_out)).collect()
    };
    assert_eq!(figures(&between), [(5, 0)]);

    engine.pass(Some(Duration::ZERO)).unwrap();
    let mut reply = [0u8; 5];
    client.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"!ping");
    let after = engine.core.stats_changes(&every, 0, between.epoch);
    assert_eq!(figures(&after), [(5, 5)], "the write is a change too");
}

/// A new generation of the test plugin.
fn reader() -> LoadedPlugin {
    plugin_host::in_process(&test_plugin::DESCRIPTOR).unwrap()
}

/// The generations `ListPlugins` shows of the test plugin, with their
/// states.
fn listed(engine: &Engine) -> Vec<(u32, GenerationState)> {
    let plugins: Vec<PluginInfo> = engine.core.list_plugins();
    assert_eq!(plugins.len(), 1, "{plugins:?}");
    plugins[0].generations.iter().map(|g| (g.generation, g.state)).collect()
}

fn count(listed: &[(u32, GenerationState)], state: GenerationState) -> usize {
    listed.iter().filter(|(_, s)| *s == state).count()
}

#[test]
fn fifty_reloads_keep_a_bounded_table_and_numbers_keep_increasing() {
    let (mut engine, listener) = engine_with_listener(&[]);
    for generation in 2..=51 {
        // With a drain timeout: the timers of activations whose generation
        // was forgotten since fire below, and must find nothing to do.
        let info = engine.core.add_plugin(reader(), true, Some(Duration::from_millis(1))).unwrap();
        assert_eq!(info.current_generation, generation);
        let numbers: Vec<u32> = info.generations.iter().map(|g| g.generation).collect();
        assert!(numbers.is_sorted() && numbers.last() == Some(&generation), "{numbers:?}");
        assert!(info.generations.len() <= 1 + 4 + 8, "{numbers:?}");
    }
    // 1 current, 4 on standby for a rollback, the newest 8 retired.
    let expected: Vec<(u32, GenerationState)> = (39..=46)
        .map(|g| (g, GenerationState::Retired))
        .chain((47..=50).map(|g| (g, GenerationState::Standby)))
        .chain([(51, GenerationState::Current)])
        .collect();
    assert_eq!(listed(&engine), expected);
    assert_eq!(engine.core.plugins.len(), 13);

    std::thread::sleep(Duration::from_millis(2));
    engine.pass(Some(Duration::ZERO)).unwrap();
    assert_eq!(engine.n_channels(), 1, "the listener survived the drain timers");
    let info = engine.core.listener_info(&engine.core.listeners[&ListenerId(listener.id)]);
    assert_eq!((info.generation, info.listening), (51, true));

    // The next number follows the newest ever given, and a restore may
    // not reuse one, forgotten or not.
    let taken = engine.core.add_plugin_as(reader(), false, None, Some(3)).unwrap_err();
    assert!(matches!(taken, CommandError::GenerationTaken { newest: 51, .. }), "{taken:?}");
    let activated = engine.core.activate_plugin("reader", 3, None).unwrap_err();
    assert!(matches!(activated, CommandError::NoGeneration { generation: 3, .. }), "{activated:?}");
    assert_eq!(engine.core.add_plugin(reader(), true, None).unwrap().current_generation, 52);
}

#[test]
fn a_stopped_listener_of_a_forgotten_generation_still_lists() {
    let (mut engine, listener) = engine_with_listener(&[]);
    engine.stop_listener(listener.id, false).unwrap();
    for _ in 0..20 {
        engine.add_plugin(reader(), true).unwrap();
    }
    assert!(!listed(&engine).iter().any(|&(g, _)| g == 1), "generation 1 is forgotten: {:?}", listed(&engine));
    let info = engine.core.listener_info(&engine.core.listeners[&ListenerId(listener.id)]);
    assert_eq!((info.plugin.as_str(), info.generation, info.listening), ("reader", 1, false));
    // Unloading every generation forgets the oldest records too, and
    // reloading goes on counting.
    engine.core.unload_plugin("reader", None, false).unwrap();
    assert_eq!(count(&listed(&engine), GenerationState::Retired), 8);
    assert_eq!(engine.add_plugin(reader(), true).unwrap().current_generation, 22);
}

#[test]
fn an_old_retired_generation_is_kept_until_its_last_channel_is_gone() {
    let (mut engine, listener) = engine_with_listener(&[]);
    engine.set_close_timeout(Duration::from_millis(10));
    let _client = TcpStream::connect(listener.address).unwrap();
    run_until(&mut engine, "the connection is accepted", |engine| engine.n_channels() == 2);
    // The connection stays on generation 1 (the plugin hands nothing
    // over), so generation 1 drains while 20 others come and go.
    for _ in 0..20 {
        engine.add_plugin(reader(), true).unwrap();
    }
    assert_eq!(listed(&engine)[0], (1, GenerationState::Draining));
    let info = engine.core.unload_plugin("reader", Some(1), true).unwrap();
    assert_eq!((info.generations[0].generation, info.generations[0].live_channels), (1, 1));
    assert_eq!(info.generations[0].state, GenerationState::Retired);

    // Closed by the close timeout; the pass that finalizes it forgets it.
    run_until(&mut engine, "the connection is closed", |engine| engine.n_channels() == 1);
    engine.pass(Some(Duration::ZERO)).unwrap();
    let listed = listed(&engine);
    assert_eq!(listed.first().map(|&(g, _)| g), Some(9), "{listed:?}");
    assert_eq!(count(&listed, GenerationState::Retired), 8);
    assert_eq!(engine.core.plugins.len(), 13);
}

#[test]
fn plugins_and_commands_cross_to_the_loop_thread() {
    fn assert_send<T: Send>() {}
    assert_send::<LoadedPlugin>();
    assert_send::<Command>();
    assert_send::<EngineHandle>();
}
