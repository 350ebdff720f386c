//! The echo plugin through an in-process daemon: exact bytes, exact
//! counters, stats streaming, graceful close and stopping a listener.

use std::{collections::HashMap, net::SocketAddr};

use asyncore_proto::v1::{self, ChannelKind};
use asyncore_tests::{InProcessDaemon, Rng, eventually, within};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_stream::StreamExt;

use crate::runtime;

/// Sends `payload` and reads it back concurrently (the echo pushes back
/// when the client does not read).
async fn echo_round_trip(stream: &mut TcpStream, payload: &[u8]) -> Vec<u8> {
    let (mut reader, mut writer) = stream.split();
    let mut back = vec![0u8; payload.len()];
    let (written, read) =
        within("an echo round trip", async { tokio::join!(writer.write_all(payload), reader.read_exact(&mut back)) })
            .await;
    written.expect("write payload");
    read.expect("read echo");
    back
}

#[test]
fn hundred_clients_echo_exact_bytes_with_exact_counters() {
    runtime().block_on(async {
        let daemon = InProcessDaemon::start().await;
        let mut client = daemon.client().await;
        let (listener_id, address) = client.start_listener("echo", &[]).await;

        // 100 clients, payloads from 1 byte to 1 MiB, all at once.
        let mut rng = Rng::new(7);
        let mut sizes: Vec<usize> = (0..100).map(|_| rng.range(1, 1 << 20)).collect();
        sizes[0] = 1;
        sizes[1] = 1 << 20;
        let tasks: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let payload = Rng::new(i as u64 + 100).bytes(size);
                tokio::spawn(async move {
                    let mut stream = TcpStream::connect(address).await.unwrap();
                    let back = echo_round_trip(&mut stream, &payload).await;
                    assert!(back == payload, "client {i}: echoed bytes differ");
                    (stream.local_addr().unwrap(), size, stream)
                })
            })
            .collect();
        let mut clients: Vec<(SocketAddr, usize, TcpStream)> = Vec::new();
        for task in tasks {
            clients.push(task.await.unwrap());
        }

        // ListChannels shows each client with exact counters (the echo is
        // complete on the client side, so bytes_out is final too).
        let channels: Vec<v1::Channel> = client
            .channels_of(listener_id)
            .await
            .into_iter()
            .filter(|c| c.kind != ChannelKind::Listening as i32)
            .collect();
        let by_peer: HashMap<String, &v1::Channel> = channels.iter().map(|c| (c.peer_address.clone(), c)).collect();
        assert_eq!(channels.len(), 100, "one channel per client");
        for (peer, size, _) in &clients {
            let channel = by_peer.get(&peer.to_string()).unwrap_or_else(|| panic!("no channel for {peer}"));
            assert_eq!(channel.kind, ChannelKind::Accepted as i32);
            assert_eq!(channel.plugin, "echo");
            assert_eq!(channel.listener_id, listener_id);
            assert_eq!(channel.bytes_in, *size as u64, "bytes_in of {peer}");
            assert_eq!(channel.bytes_out, *size as u64, "bytes_out of {peer}");
            assert_eq!(channel.pending_output, 0);
            assert!(channel.reads >= 1 && channel.writes >= 1);
            assert!(channel.created_at.is_some());
            assert_eq!(channel.local_address, address.to_string());
        }
        let listener = client.listeners.list_listeners(v1::ListListenersRequest::default()).await.unwrap().into_inner();
        assert_eq!(listener.listeners[0].channel_count, 100);

        // WatchStats: several messages covering every client; a channel
        // closed meanwhile is reported once more, closed, with its final
        // figures.
        let mut stream = client
            .channels
            .watch_stats(v1::WatchStatsRequest {
                interval_ms: 100,
                listener_id: Some(listener_id),
                channel_ids: vec![],
                changed_only: false,
            })
            .await
            .unwrap()
            .into_inner();
        let first = within("a stats message", stream.next()).await.unwrap().unwrap();
        assert_eq!(first.channels.len(), 100);
        assert!(first.channels.iter().all(|c| !c.closed));
        let second = within("a stats message", stream.next()).await.unwrap().unwrap();
        assert_eq!(second.seq, first.seq + 1);
        assert_eq!(second.channels.len(), 100);

        let (closed_peer, closed_size, closed_stream) = clients.remove(5);
        let closed_id = by_peer[&closed_peer.to_string()].id;
        drop(closed_stream);
        let mut closed_reports = Vec::new();
        for _ in 0..30 {
            let update = within("a stats message", stream.next()).await.unwrap().unwrap();
            closed_reports.extend(update.channels.iter().filter(|c| c.channel_id == closed_id).cloned());
            if closed_reports.iter().any(|c| c.closed) {
                // One more message: the closed channel must not reappear.
                let next = within("a stats message", stream.next()).await.unwrap().unwrap();
                assert!(next.channels.iter().all(|c| c.channel_id != closed_id), "closed channel reported twice");
                assert_eq!(next.channels.len(), 99);
                break;
            }
        }
        let last = closed_reports.last().expect("closed channel reported");
        assert!(last.closed, "closed flag set");
        assert_eq!(closed_reports.iter().filter(|c| c.closed).count(), 1);
        assert_eq!(last.bytes_in, closed_size as u64);
        assert_eq!(last.bytes_out, closed_size as u64);
        drop(stream);

        // Watching chosen channels reports exactly those.
        let (watched_peer, watched_size, _) = &clients[3];
        let watched = by_peer[&watched_peer.to_string()].id;
        let mut stream = client
            .channels
            .watch_stats(v1::WatchStatsRequest {
                interval_ms: 50,
                listener_id: None,
                channel_ids: vec![watched, 999_999],
                changed_only: false,
            })
            .await
            .unwrap()
            .into_inner();
        let update = within("a stats message", stream.next()).await.unwrap().unwrap();
        assert_eq!(update.channels.len(), 1);
        assert_eq!(update.channels[0].channel_id, watched);
        assert_eq!(update.channels[0].bytes_in, *watched_size as u64);
        drop(stream);

        // CloseChannel: graceful; the client reads every pending byte, then
        // EOF.
        let (_, echoed_before, victim) = clients.remove(0);
        let victim_id = by_peer[&victim.local_addr().unwrap().to_string()].id;
        // More than every socket buffer on the way can hold.
        let payload = Rng::new(99).bytes(32 << 20);
        let (mut reader, mut writer) = victim.into_split();
        let writer_task = tokio::spawn(async move {
            // The daemon stops reading at its high-water mark; the rest of
            // this write is drained (and discarded) once it closes.
            let _ = writer.write_all(&payload).await;
            // Returned, not dropped: dropping would half-close, which the
            // echo answers by closing on its own.
            (payload, writer)
        });
        // Let output pile up while the client does not read.
        eventually!(
            async || {
                let channel = client.channels.get_channel(v1::GetChannelRequest { id: victim_id }).await.unwrap();
                channel.into_inner().pending_output > 0
            },
            "output queued for a client that does not read"
        )
        .await;
        let closing =
            client.channels.close_channel(v1::CloseChannelRequest { id: victim_id }).await.unwrap().into_inner();
        assert_eq!(closing.state, v1::ChannelState::Closing as i32);
        let mut received = Vec::new();
        within("EOF after CloseChannel", reader.read_to_end(&mut received)).await.expect("read to EOF");
        let (payload, _writer) = within("the writer to finish", writer_task).await.unwrap();
        // Everything the daemon had read was echoed before EOF, not one byte
        // more.
        assert_eq!((echoed_before + received.len()) as u64, closing.bytes_in);
        assert!(received == payload[..received.len()], "echoed prefix intact");
        // The daemon lingers, discarding input, until the client closes too;
        // then the channel leaves the map.
        drop((_writer, reader));
        let status = eventually!(
            async || client.channels.get_channel(v1::GetChannelRequest { id: victim_id }).await.err(),
            "the closed channel to leave the map"
        )
        .await;
        assert_eq!(status.code(), tonic::Code::NotFound);

        // StopListener: new connections are refused, existing ones keep
        // echoing.
        let stopped = client
            .listeners
            .stop_listener(v1::StopListenerRequest { id: listener_id, close_channels: false, drain_timeout_ms: None })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stopped.state, v1::ListenerState::Stopped as i32);
        let refused = TcpStream::connect(address).await;
        assert!(refused.is_err(), "connect after StopListener must fail");
        for (i, (_, _, stream)) in clients.iter_mut().enumerate().take(10) {
            let payload = Rng::new(1000 + i as u64).bytes(10_000);
            assert!(echo_round_trip(stream, &payload).await == payload, "client {i} still echoes");
        }
    });
}

#[test]
fn stop_listener_with_close_channels_closes_them_gracefully() {
    runtime().block_on(async {
        let daemon = InProcessDaemon::start().await;
        let mut client = daemon.client().await;
        let (id, address) = client.start_listener("echo", &[]).await;
        let mut stream = TcpStream::connect(address).await.unwrap();
        assert_eq!(echo_round_trip(&mut stream, b"bye").await, b"bye");
        client
            .listeners
            .stop_listener(v1::StopListenerRequest { id, close_channels: true, drain_timeout_ms: None })
            .await
            .unwrap();
        let mut rest = Vec::new();
        within("EOF after StopListener", stream.read_to_end(&mut rest)).await.expect("EOF, not a reset");
        assert!(rest.is_empty());
        assert!(TcpStream::connect(address).await.is_err());
    });
}
