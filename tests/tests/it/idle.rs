//! The per-pass cost of the loop does not grow with idle channels: with
//! thousands of idle connections open, an echo round trip on one active
//! connection costs as many loop passes, handler calls and interest queries
//! as with none. Counted, not timed.

use asyncore_proto::v1;
use asyncore_tests::{Client, InProcessDaemon, eventually, within};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::runtime;

const IDLE: usize = 3000;
const ROUND_TRIPS: u64 = 50;

#[derive(Debug, Clone, Copy)]
struct Cost {
    passes: u64,
    handler_calls: u64,
    interest_queries: u64,
    events: u64,
}

async fn round_trips(client: &mut Client, stream: &mut TcpStream) -> Cost {
    let before = client.daemon.get_loop_stats(v1::GetLoopStatsRequest {}).await.unwrap().into_inner();
    for i in 0..ROUND_TRIPS {
        let message = [i as u8; 64];
        stream.write_all(&message).await.unwrap();
        let mut back = [0u8; 64];
        within("an echo round trip", stream.read_exact(&mut back)).await.unwrap();
        assert_eq!(back, message);
    }
    let after = client.daemon.get_loop_stats(v1::GetLoopStatsRequest {}).await.unwrap().into_inner();
    Cost {
        passes: after.passes - before.passes,
        handler_calls: after.handler_calls - before.handler_calls,
        interest_queries: after.interest_queries - before.interest_queries,
        events: after.events - before.events,
    }
}

#[track_caller]
fn assert_about_the_same(what: &str, idle: u64, none: u64) {
    // The same work, give or take a wake-up that split one read in two.
    assert!(idle <= none + none / 5 + 5, "{what}: {idle} with {IDLE} idle channels, {none} with none");
}

#[test]
fn idle_channels_cost_nothing_per_pass() {
    runtime().block_on(async {
        let daemon = InProcessDaemon::start().await;
        let mut client = daemon.client().await;
        let (listener_id, address) = client.start_listener("echo", &[]).await;
        let mut active = TcpStream::connect(address).await.unwrap();
        active.set_nodelay(true).unwrap();
        round_trips(&mut client, &mut active).await; // warm up
        let none = round_trips(&mut client, &mut active).await;

        let mut idle = Vec::with_capacity(IDLE);
        for _ in 0..IDLE {
            idle.push(TcpStream::connect(address).await.unwrap());
        }
        eventually!(
            async || {
                let listeners =
                    client.listeners.list_listeners(v1::ListListenersRequest::default()).await.unwrap().into_inner();
                let listener = listeners.listeners.iter().find(|l| l.id == listener_id).unwrap();
                listener.channel_count == IDLE as u64 + 1
            },
            "all {IDLE} idle connections accepted"
        )
        .await;
        round_trips(&mut client, &mut active).await; // settle
        let with_idle = round_trips(&mut client, &mut active).await;

        assert!(none.handler_calls >= ROUND_TRIPS, "each round trip calls handle_read: {none:?}");
        assert_about_the_same("passes", with_idle.passes, none.passes);
        assert_about_the_same("handler calls", with_idle.handler_calls, none.handler_calls);
        assert_about_the_same("interest queries", with_idle.interest_queries, none.interest_queries);
        assert_about_the_same("events", with_idle.events, none.events);
        drop(idle);
    });
}
