//! A plugin that panics closes its own channel; the daemon and every other
//! channel carry on. Also the other plugin callbacks of the fixture
//! (`handle_expt`).

use asyncore_proto::v1;
use asyncore_tests::{Daemon, InProcessDaemon, Options, eventually, within};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::runtime;

#[test]
fn a_panic_in_handle_read_closes_only_that_channel() {
    // The binary: the panic and the plugin's own records are read from its
    // log.
    let mut daemon = Daemon::start_with(Options {
        plugins: vec!["asyncore_fixture_panicky", "asyncore_plugin_echo"],
        ..Options::default()
    });
    runtime().block_on(async {
        let mut client = daemon.client().await;
        let (_, panicky) = client.start_listener("panicky", &[]).await;
        let (_, echo) = client.start_listener("echo", &[]).await;

        let mut calm = TcpStream::connect(panicky).await.unwrap();
        let mut other_plugin = TcpStream::connect(echo).await.unwrap();
        let mut doomed = TcpStream::connect(panicky).await.unwrap();
        for stream in [&mut calm, &mut other_plugin, &mut doomed] {
            stream.write_all(b"hello").await.unwrap();
            let mut back = [0u8; 5];
            within("an echo", stream.read_exact(&mut back)).await.unwrap();
            assert_eq!(&back, b"hello");
        }

        doomed.write_all(b"PANIC now").await.unwrap();
        let mut rest = Vec::new();
        let n = within("the panicking channel to close", doomed.read_to_end(&mut rest)).await.unwrap_or(0);
        assert_eq!(n, 0, "the panicking channel is closed without an echo");

        for stream in [&mut calm, &mut other_plugin] {
            stream.write_all(b"again").await.unwrap();
            let mut back = [0u8; 5];
            within("an echo", stream.read_exact(&mut back)).await.unwrap();
            assert_eq!(&back, b"again");
        }

        // Once the peer closes too, only the calm channel is left.
        drop(doomed);
        let panicky_info = eventually!(
            async || {
                let plugins =
                    client.plugins.list_plugins(v1::ListPluginsRequest::default()).await.unwrap().into_inner();
                plugins.plugins.into_iter().find(|p| p.name == "panicky" && p.live_channels == 1)
            },
            "the panicked channel to leave the map"
        )
        .await;
        assert_eq!(panicky_info.panics, 1);
        let stats = client.daemon.get_loop_stats(v1::GetLoopStatsRequest {}).await.unwrap().into_inner();
        assert_eq!(stats.panics, 1);
        eventually!(
            async || daemon.log().contains("fixture asked to panic on channel"),
            "the panic message in the log:\n{}",
            daemon.log()
        )
        .await;
    });
    let log = daemon.log();
    let line = log.lines().find(|l| l.contains("fixture asked to panic")).unwrap();
    assert!(line.contains("plugin=panicky") && line.contains("channel="), "{line}");
    // The plugin's own log records reach the daemon's log, attributed.
    assert!(
        log.lines().any(|l| l.contains("plugin=panicky") && l.contains("accepted channel") && l.contains("127.0.0.1")),
        "forwarded plugin log; log:\n{log}"
    );
    daemon.assert_running();
}

#[test]
fn urgent_data_reaches_handle_expt_and_the_stream_goes_on() {
    runtime().block_on(async {
        let daemon =
            InProcessDaemon::start_with(Options { plugins: vec!["asyncore_fixture_panicky"], ..Options::default() })
                .await;
        let mut client = daemon.client().await;
        let (_, address) = client.start_listener("panicky", &[]).await;
        let stream = std::net::TcpStream::connect(address).unwrap();
        socket2::SockRef::from(&stream).send_out_of_band(b"!").unwrap();
        let mut stream = TcpStream::from_std({
            stream.set_nonblocking(true).unwrap();
            stream
        })
        .unwrap();
        let mut back = [0u8; 7];
        within("handle_expt's answer", stream.read_exact(&mut back)).await.unwrap();
        assert_eq!(&back, b"urgent\n");
        stream.write_all(b"after").await.unwrap();
        let mut echo = [0u8; 5];
        within("the echo", stream.read_exact(&mut echo)).await.unwrap();
        assert_eq!(&echo, b"after", "the urgent byte is not in the stream");
    });
}
