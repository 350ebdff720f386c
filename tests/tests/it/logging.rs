//! The daemon's logging never holds up its work: a stderr nobody reads
//! loses log records instead of stopping the poll loop.

use asyncore_tests::{Daemon, Options, within};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::runtime;

#[test]
fn a_stalled_stderr_does_not_stop_the_daemon() {
    // Debug logs every accept and close: the connections below log far
    // more than the pipe holds (64 KiB), so a blocking writer would stall.
    let daemon = Daemon::start_with(Options {
        stalled_stderr: true,
        env: vec![("RUST_LOG".into(), "info,asyncore_engine=debug".into())],
        ..Options::default()
    });
    runtime().block_on(async {
        let mut client = daemon.client().await;
        let (_, address) = client.start_listener("echo", &[]).await;
        for i in 0..2000u32 {
            let mut stream = within(format!("connection {i}"), TcpStream::connect(address)).await.unwrap();
            stream.write_all(&i.to_le_bytes()).await.unwrap();
            let mut back = [0u8; 4];
            within(format!("the echo on connection {i}"), stream.read_exact(&mut back)).await.unwrap();
            assert_eq!(u32::from_le_bytes(back), i);
        }
        // The control API (on other threads, logging too) still answers.
        client.daemon.get_loop_stats(asyncore_proto::v1::GetLoopStatsRequest {}).await.expect("GetLoopStats");
    });
}
