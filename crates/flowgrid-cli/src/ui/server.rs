//! The UI's HTTP server: connections bounded in number, and requests in the time their
//! heads and bodies take, so that clients that stall cannot hold the UI.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, HttpBody};
use axum::extract::{Request, State};
use axum::http::header::RETRY_AFTER;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Router;
use futures::StreamExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::api;

/// How long a client may take to send a request's head (its first line and headers), and
/// how long a kept-alive connection waits for its next request: a head of a few KiB comes
/// at once, so a client that stalls in it is let go (its connection closed) instead of
/// holding a connection for ever.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request's body may pause (no byte coming): a client that stops sending in the
/// middle of a body is answered 408 and let go.
pub(super) const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests with a body served at once (forms, the API's changes): each may hold up to
/// [`super::BODY_BYTES_MAX`] while it is read, so together at most ~100 MiB.
const BODIES_READ_MAX: usize = 16;
/// How long a whole request body may take: the largest ([`super::BODY_BYTES_MAX`]) takes about
/// 50 s at 1 Mbit/s; a client that sends a byte now and then is let go after this.
pub(super) const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections open at once; past it, a new one waits (in the listener's backlog) until one
/// ends. Well under the 1,024 file descriptors a process is often allowed, which the UI
/// shares with its NATS connection; twice [`api::LIVE_STREAMS_MAX`], so that live streams
/// leave room for the pages.
const CONNECTIONS_MAX: usize = 512;
const _: () = assert!(CONNECTIONS_MAX >= 2 * api::LIVE_STREAMS_MAX);
/// How long the UI waits before it takes connections again when taking one failed for
/// another reason than the client (out of file descriptors: wait for some to close).
const ACCEPT_RETRY_WAIT: Duration = Duration::from_secs(1);

/// Serves `app` on the connections of `listener`, at most [`CONNECTIONS_MAX`] at once, each
/// bounded in the time its requests' heads take ([`HEADER_READ_TIMEOUT`]; their bodies are
/// bounded by [`bounded_body`]). Once `stopping`, it takes no more connections, lets the
/// requests under way end, and returns when every connection has closed.
pub(super) async fn serve_connections(listener: TcpListener, app: Router, stopping: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    let connections = tokio_util::task::TaskTracker::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    // Without a timer hyper bounds no read: a client could hold a connection by never
    // ending its request's head.
    http.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    loop {
        let taken = async {
            let slot = Arc::clone(&slots).acquire_owned().await.expect("the semaphore is never closed");
            (accept(&listener).await, slot)
        };
        let (stream, slot) = tokio::select! {
            taken = taken => taken,
            () = stopping.cancelled() => break,
        };
        let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let stopping = stopping.clone();
        connections.spawn(async move {
            let _slot = slot;
            let mut connection = std::pin::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                () = stopping.cancelled() => {
                    // The request under way is answered; the connection then closes.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = served {
                tracing::debug!(error = %error, "a connection to the UI ended with an error");
            }
        });
    }
    connections.close();
    connections.wait().await;
}

/// The next connection of `listener`. A failure of one connection (reset before it was
/// taken) is passed over; another (out of file descriptors) waits [`ACCEPT_RETRY_WAIT`].
async fn accept(listener: &TcpListener) -> tokio::net::TcpStream {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => return stream,
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionRefused
                ) => {}
            Err(error) => {
                tracing::warn!(error = %error, "cannot take a connection to the UI; trying again");
                tokio::time::sleep(ACCEPT_RETRY_WAIT).await;
            }
        }
    }
}

/// Bounds the time a request's body takes to come ([`BODY_IDLE_TIMEOUT`] without a byte,
/// [`BODY_READ_TIMEOUT`] in all): a client that stops sending in the middle of one is
/// answered 408 instead of holding its connection, and memory, for ever. A request without
/// a body (every GET, a live stream among them) has nothing to bound.
///
/// At most [`BODIES_READ_MAX`] requests with a body are served at once (`reading`): a
/// form's token is in its body, so each is read whole, up to [`super::BODY_BYTES_MAX`],
/// before it can be refused; one past the bound is answered at once (503, or the API's
/// `429 overloaded`), and the bodies held stay within `BODIES_READ_MAX` of that size.
pub(super) async fn bounded_body(
    State(reading): State<Arc<Semaphore>>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    if request.body().size_hint().exact() == Some(0) {
        return next.run(request).await;
    }
    let Ok(_reading) = reading.try_acquire() else {
        let message = format!(
            "the UI is reading {BODIES_READ_MAX} requests' bodies already, the most it reads at once: send it again \
             in a moment"
        );
        if request.uri().path().starts_with("/api/") {
            return api::overloaded(&message);
        }
        let mut refused = super::failure(StatusCode::SERVICE_UNAVAILABLE, &message);
        refused.headers_mut().insert(RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
        return refused;
    };
    next.run(request.map(|body| read_in_time(body, BODY_IDLE_TIMEOUT, BODY_READ_TIMEOUT))).await
}

/// The reading of request bodies [`bounded_body`] shares.
pub(super) fn body_readers() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(BODIES_READ_MAX))
}

/// `body`, failing with [`BodyTooSlow`] when a piece of it does not come within `idle` of
/// the last (or of the start), or when it is not all in within `total`.
pub(super) fn read_in_time(body: Body, idle: Duration, total: Duration) -> Body {
    let deadline = tokio::time::Instant::now() + total;
    let pieces = futures::stream::unfold(Some(body.into_data_stream()), move |pieces| async move {
        let mut pieces = pieces?;
        let until = deadline.min(tokio::time::Instant::now() + idle);
        match tokio::time::timeout_at(until, pieces.next()).await {
            Ok(Some(piece)) => Some((piece.map_err(axum::BoxError::from), Some(pieces))),
            Ok(None) => None,
            Err(_) => Some((Err(axum::BoxError::from(BodyTooSlow)), None)),
        }
    });
    Body::from_stream(pieces)
}

/// A request body that did not come in time (see [`bounded_body`]).
#[derive(Debug)]
pub(super) struct BodyTooSlow;

impl std::fmt::Display for BodyTooSlow {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "the request's body did not come in time (the UI waits {} s for each piece of it and {} s for all of \
             it): send it again, at once",
            BODY_IDLE_TIMEOUT.as_secs(),
            BODY_READ_TIMEOUT.as_secs()
        )
    }
}

impl std::error::Error for BodyTooSlow {}

/// Whether `error` (a rejection of a request's body) is, or was caused by, [`BodyTooSlow`].
pub(super) fn body_too_slow(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error.is::<BodyTooSlow>() {
            return true;
        }
        cause = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use axum::extract::FromRequest;
    use bytes::Bytes;

    use super::*;

    /// A form sent to the UI whose body is `body` read in time (`idle`, `total`): the
    /// rejection of its fields, if any.
    async fn form_of(body: Body, idle: Duration, total: Duration) -> Option<axum::extract::rejection::FormRejection> {
        let request = axum::http::Request::post("/runs")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(read_in_time(body, idle, total))
            .unwrap();
        axum::Form::<std::collections::HashMap<String, String>>::from_request(request, &()).await.err()
    }

    #[tokio::test]
    async fn a_body_that_pauses_or_trickles_is_refused_as_too_slow_and_one_that_comes_is_read() {
        // A few bytes, then nothing: refused after the pause.
        let stalled = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"token=x"))])
            .chain(futures::stream::pending());
        let refused = form_of(Body::from_stream(stalled), Duration::from_millis(100), Duration::from_secs(60)).await;
        assert!(refused.as_ref().is_some_and(|rejection| body_too_slow(rejection)), "{refused:?}");
        // A byte now and then, never pausing long: refused when the whole has taken too long.
        let trickle = futures::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Some((Ok::<_, std::io::Error>(Bytes::from_static(b"a")), ()))
        });
        let refused = form_of(Body::from_stream(trickle), Duration::from_secs(60), Duration::from_millis(200)).await;
        assert!(refused.as_ref().is_some_and(|rejection| body_too_slow(rejection)), "{refused:?}");
        // A body that comes is read whole; another failure is not taken for slowness.
        let whole = form_of(Body::from("token=x&flow=f"), Duration::from_millis(100), Duration::from_secs(1)).await;
        assert!(whole.is_none(), "{whole:?}");
        let broken = futures::stream::iter([Err::<Bytes, _>(std::io::Error::other("reset"))]);
        let refused = form_of(Body::from_stream(broken), Duration::from_secs(1), Duration::from_secs(1)).await;
        assert!(refused.as_ref().is_some_and(|rejection| !body_too_slow(rejection)), "{refused:?}");
    }
}
