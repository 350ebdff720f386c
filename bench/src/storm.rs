//! The control-plane storm: clients of asyncored's gRPC API that never
//! rest, `ListChannels` paging through every channel back to back and a
//! `WatchStats` stream of every channel, while the echo load runs; or only
//! `WatchStats` streams of what changed, as monitors would ask.
//!
//! The clients run in the harness, on the generator's core, so they must
//! cost it little: their answers are decoded with skimming types that keep
//! each channel as raw bytes (to count them) and skip the fields, where the
//! generated types would allocate every string of 10,000 channels.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use asyncore_proto::v1::{ListChannelsRequest, WatchStatsRequest};

use crate::scenario::StormClients;
use http::uri::PathAndQuery;
use tonic::client::Grpc;
use tonic::transport::Channel;
use tonic_prost::ProstCodec;

/// `ListChannels` page size: the API's default, what `asyncorectl channels
/// ls` asks for.
const PAGE_SIZE: u32 = 1000;
/// `WatchStats` interval: ten updates of every channel a second.
pub(crate) const WATCH_INTERVAL_MS: u32 = 100;

/// `ListChannelsResponse`, each channel left encoded.
#[derive(Clone, PartialEq, prost::Message)]
struct ChannelsPage {
    #[prost(bytes = "vec", repeated, tag = "1")]
    channels: Vec<Vec<u8>>,
    #[prost(string, tag = "2")]
    next_page_token: String,
}

/// `StatsUpdate`, each channel's figures left encoded.
#[derive(Clone, PartialEq, prost::Message)]
struct StatsSkim {
    #[prost(uint64, tag = "1")]
    seq: u64,
    #[prost(bytes = "vec", repeated, tag = "4")]
    channels: Vec<Vec<u8>>,
}

async fn connect(control: SocketAddr) -> anyhow::Result<Grpc<Channel>> {
    let channel = Channel::from_shared(format!("http://{control}"))?.connect().await.context("control API")?;
    Ok(Grpc::new(channel).max_decoding_message_size(64 * 1024 * 1024))
}

/// Pages through every channel once; returns how many there are.
async fn list_all(client: &mut Grpc<Channel>) -> anyhow::Result<usize> {
    let mut page_token = String::new();
    let mut channels = 0;
    loop {
        client.ready().await.context("control API")?;
        let request = ListChannelsRequest { listener_id: None, page_size: PAGE_SIZE, page_token };
        let page: ChannelsPage = client
            .unary(
                tonic::Request::new(request),
                PathAndQuery::from_static("/asyncore.v1.Channels/ListChannels"),
                ProstCodec::<ListChannelsRequest, ChannelsPage>::default(),
            )
            .await?
            .into_inner();
        channels += page.channels.len();
        if page.next_page_token.is_empty() {
            return Ok(channels);
        }
        page_token = page.next_page_token;
    }
}

/// How many channels the daemon at `control` lists.
///
/// # Errors
///
/// If the control API fails.
pub(crate) fn count_channels(runtime: &tokio::runtime::Handle, control: SocketAddr) -> anyhow::Result<usize> {
    runtime.block_on(async { list_all(&mut connect(control).await?).await })
}

/// What a storm did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StormFigures {
    /// Complete listings of every channel per second.
    pub(crate) listings_per_second: f64,
    /// `WatchStats` updates received per second, per stream.
    pub(crate) updates_per_second: f64,
    /// `WatchStats` streams.
    pub(crate) watchers: usize,
    /// Channels in the last listing.
    pub(crate) channels_listed: u64,
    /// Channels in the largest stats update (with `changed_only`, the
    /// first, which lists them all).
    pub(crate) channels_watched: u64,
}

/// A storm under way; [`Storm::stop`] ends it.
#[derive(Debug)]
pub(crate) struct Storm {
    started: Instant,
    listings: Arc<AtomicU64>,
    updates: Arc<AtomicU64>,
    channels_listed: Arc<AtomicU64>,
    channels_watched: Arc<AtomicU64>,
    error: Arc<Mutex<Option<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// `WatchStats` streams: updates are counted per stream.
    watchers: usize,
}

impl Storm {
    /// Starts the storm's clients against the daemon at `control`.
    ///
    /// # Errors
    ///
    /// If the control API cannot be reached.
    pub(crate) fn start(
        runtime: &tokio::runtime::Handle,
        control: SocketAddr,
        clients: StormClients,
    ) -> anyhow::Result<Storm> {
        let storm = Storm {
            started: Instant::now(),
            listings: Arc::default(),
            updates: Arc::default(),
            channels_listed: Arc::default(),
            channels_watched: Arc::default(),
            error: Arc::default(),
            tasks: Vec::new(),
            watchers: 1,
        };
        let (watchers, changed_only) = match clients {
            StormClients::ListAndWatch => (1, false),
            StormClients::Watchers(n) => (n, true),
        };
        let mut tasks = Vec::new();
        if clients == StormClients::ListAndWatch {
            let mut lister = runtime.block_on(connect(control))?;
            let (listings, channels_listed, error) =
                (storm.listings.clone(), storm.channels_listed.clone(), storm.error.clone());
            tasks.push(runtime.spawn(async move {
                loop {
                    match list_all(&mut lister).await {
                        Ok(channels) => {
                            channels_listed.store(channels as u64, Ordering::Relaxed);
                            listings.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            *error.lock().expect("error slot") = Some(format!("ListChannels: {e:#}"));
                            return;
                        }
                    }
                }
            }));
        }
        for _ in 0..watchers {
            let mut watcher = runtime.block_on(connect(control))?;
            let (updates, channels_watched, error) =
                (storm.updates.clone(), storm.channels_watched.clone(), storm.error.clone());
            tasks.push(runtime.spawn(async move {
                let result = async {
                    watcher.ready().await?;
                    let request =
                        WatchStatsRequest { interval_ms: WATCH_INTERVAL_MS, changed_only, ..Default::default() };
                    let mut stream = watcher
                        .server_streaming(
                            tonic::Request::new(request),
                            PathAndQuery::from_static("/asyncore.v1.Channels/WatchStats"),
                            ProstCodec::<WatchStatsRequest, StatsSkim>::default(),
                        )
                        .await?
                        .into_inner();
                    while let Some(update) = stream.message().await? {
                        // With `changed_only`, the first message lists
                        // every channel and the others what changed.
                        channels_watched.fetch_max(update.channels.len() as u64, Ordering::Relaxed);
                        updates.fetch_add(1, Ordering::Relaxed);
                    }
                    Err::<(), anyhow::Error>(anyhow!("the stream ended"))
                }
                .await;
                if let Err(e) = result {
                    *error.lock().expect("error slot") = Some(format!("WatchStats: {e:#}"));
                }
            }));
        }
        if changed_only {
            // Each stream's first message lists every channel: a one-time
            // cost, left out of the measurement.
            let deadline = Instant::now() + Duration::from_secs(30);
            while storm.updates.load(Ordering::Relaxed) < watchers as u64 {
                if let Some(error) = storm.error.lock().expect("error slot").take() {
                    return Err(anyhow!(error));
                }
                if Instant::now() > deadline {
                    return Err(anyhow!("no first WatchStats message within 30 s"));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            storm.updates.store(0, Ordering::Relaxed);
        }
        Ok(Storm { tasks, watchers, started: Instant::now(), ..storm })
    }

    /// Ends the storm and says what it did.
    ///
    /// # Errors
    ///
    /// If a call failed meanwhile (the storm's clients stop at the first
    /// error).
    pub(crate) fn stop(self) -> anyhow::Result<StormFigures> {
        for task in &self.tasks {
            task.abort();
        }
        if let Some(error) = self.error.lock().expect("error slot").take() {
            return Err(anyhow!(error));
        }
        let seconds = self.started.elapsed().as_secs_f64().max(Duration::from_millis(1).as_secs_f64());
        Ok(StormFigures {
            listings_per_second: self.listings.load(Ordering::Relaxed) as f64 / seconds,
            updates_per_second: self.updates.load(Ordering::Relaxed) as f64 / seconds / self.watchers as f64,
            watchers: self.watchers,
            channels_listed: self.channels_listed.load(Ordering::Relaxed),
            channels_watched: self.channels_watched.load(Ordering::Relaxed),
        })
    }
}
