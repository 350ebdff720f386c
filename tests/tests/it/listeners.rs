//! Listener commands through the control API: stopping a listener twice is
//! a wrong state (`FAILED_PRECONDITION` naming it), not a silent success.

use asyncore_proto::v1;
use asyncore_tests::InProcessDaemon;
use tonic::Code;

use crate::runtime;

#[test]
fn stopping_a_stopped_listener_fails_its_precondition() {
    runtime().block_on(async {
        let daemon = InProcessDaemon::start().await;
        let mut client = daemon.client().await;
        let (id, _) = client.start_listener("echo", &[]).await;
        let stop = || v1::StopListenerRequest { id, close_channels: false, drain_timeout_ms: None };
        let stopped = client.listeners.stop_listener(stop()).await.unwrap().into_inner();
        assert_eq!(stopped.state, v1::ListenerState::Stopped as i32);

        let again = client.listeners.stop_listener(stop()).await.expect_err("already stopped");
        assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
        assert_eq!(again.message(), format!("listener {id} is already stopped"));
        let with_channels = v1::StopListenerRequest { id, close_channels: true, drain_timeout_ms: None };
        let again = client.listeners.stop_listener(with_channels).await.expect_err("still stopped");
        assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");

        let listeners =
            client.listeners.list_listeners(v1::ListListenersRequest::default()).await.unwrap().into_inner();
        assert_eq!(listeners.listeners.len(), 1, "a stopped listener is still listed");
    });
}
