//! The REST front's HTTP server: the accept loop and one hyper HTTP/1.1
//! connection per client, with the deadlines and the cap that keep a client who
//! sends nothing useful from holding the front.
//!
//! A connection is always in one of three phases, and each has its deadline:
//!
//! - **head**: from the connection's opening, or from the first byte after the
//!   previous answer, until a request's headers are complete; at most
//!   `--header-timeout-ms`, then the connection is closed (a slowloris client
//!   that sends `POST / HTTP/1.1\r\nHost: x\r\n` and stops is gone after it).
//! - **busy**: a request is being served; the handler bounds it itself (the body
//!   read by `--body-timeout-ms`, Redis by `--redis-timeout-ms`).
//! - **idle**: after an answer, waiting for the next request (keep-alive, which
//!   Envoy relies on); closed once no byte has moved either way for
//!   `--idle-timeout-ms`, which also ends an answer whose reader stopped reading.
//!
//! hyper's own `header_read_timeout` (on its Tokio timer) cannot tell the first
//! two apart from the third: its clock starts when the previous answer ends, so
//! set to the header deadline it would close every keep-alive connection idle for
//! five seconds. It is set to the idle deadline (hyper knows exactly when an
//! answer is done, a second guard on idle connections); the watchdog here tracks
//! the phases through the socket and the service and enforces the rest.
//!
//! At most `--max-connections` are open at once (kept below the process's
//! open-file limit, which is raised to fit when it can be). Past the cap a new
//! connection is accepted and closed at once rather than left unaccepted: the
//! client (Envoy) learns immediately and takes its L3 path instead of waiting
//! out its L2 timeout on a connection stuck in the listen backlog, the backlog
//! never fills with stale connections that would be served long after their
//! client gave up, and the accept loop keeps running, so file descriptors stay
//! in reserve for the Redis link's reconnects.
//!
//! On shutdown the listener closes, connections with no request in progress
//! close at once (idle ones and ones still sending a head), in-flight requests
//! are answered, and whatever is still open after `--shutdown-grace-ms` is cut.
//!
//! What it must never do: leave a connection without a deadline while no request
//! is being served, hold more connections than the cap, or wait past the grace
//! when asked to stop.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::response::Response;
use axum::Router;
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::metrics::{Closed, RestMetrics};

/// Default of `--header-timeout-ms`.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Default of `--idle-timeout-ms`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default of `--max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default of `--shutdown-grace-ms`.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// File descriptors kept out of the connection cap: the listener, stdio, the
/// runtime's own, the Redis link and its reconnect, the one a refused
/// connection holds for an instant, a CA file being read.
const FD_RESERVE: u64 = 32;

/// The server's deadlines and cap.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Longest a request's head may take, from the connection's opening or the
    /// first byte after the previous answer.
    pub header_timeout: Duration,
    /// Longest a connection may sit with no byte moving while no request is
    /// being served.
    pub idle_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
    /// Longest the shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

/// Where a connection is (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Head { since: Instant },
    Busy,
    Idle,
}

/// What the socket and the service tell the watchdog about one connection.
struct Activity {
    phase: Mutex<Phase>,
    last_io: Mutex<Instant>,
    /// Wakes the watchdog when the phase changes (its deadline moves).
    changed: Notify,
}

impl Activity {
    fn new(now: Instant) -> Self {
        Self {
            phase: Mutex::new(Phase::Head { since: now }),
            last_io: Mutex::new(now),
            changed: Notify::new(),
        }
    }

    fn phase(&self) -> MutexGuard<'_, Phase> {
        // Plain data: a panic while holding the lock cannot leave it torn.
        self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn last_io(&self) -> MutexGuard<'_, Instant> {
        self.last_io.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_phase(&self, phase: Phase) {
        *self.phase() = phase;
        self.changed.notify_one();
    }

    /// Bytes moved: on a read while idle, a new head has started.
    fn moved(&self, read: bool) {
        let now = Instant::now();
        *self.last_io() = now;
        if read {
            let mut phase = self.phase();
            if *phase == Phase::Idle {
                *phase = Phase::Head { since: now };
                drop(phase);
                self.changed.notify_one();
            }
        }
    }

    /// When the connection must be closed if nothing changes; `None` while a
    /// request is served.
    fn deadline(&self, o: &ServeOptions, stopping: bool) -> Option<(Instant, Closed)> {
        match *self.phase() {
            // Stopping: no request was read from it, so nothing is lost.
            Phase::Head { .. } if stopping => Some((Instant::now(), Closed::Shutdown)),
            Phase::Head { since } => Some((since + o.header_timeout, Closed::HeaderTimeout)),
            Phase::Busy => None,
            Phase::Idle => Some((*self.last_io() + o.idle_timeout, Closed::IdleTimeout)),
        }
    }
}

/// The socket, reporting every byte moved to its [`Activity`].
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.moved(true);
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.moved(false);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.moved(false);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Marks the connection busy while a request is served, idle once its handler
/// is done (or dropped: the client went away).
struct BusyGuard(Arc<Activity>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        // The idle clock starts now, before the watchdog is woken to read it.
        *self.0.last_io() = Instant::now();
        self.0.set_phase(Phase::Idle);
    }
}

/// The router as hyper calls it, with the connection's phase kept up to date.
struct Tracked {
    router: TowerToHyperService<Router>,
    activity: Arc<Activity>,
}

type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl Service<Request<Incoming>> for Tracked {
    type Response = Response;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.activity.set_phase(Phase::Busy);
        let busy = BusyGuard(self.activity.clone());
        let answer = self.router.call(req);
        Box::pin(async move {
            let r = answer.await;
            drop(busy);
            r
        })
    }
}

/// Decrements the open-connections gauge however the connection ends.
struct Open<'a>(&'a RestMetrics);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.connections.dec();
    }
}

/// Serves one connection until it ends, a deadline passes, or shutdown closes
/// it.
async fn connection(
    stream: TcpStream,
    router: Router,
    o: ServeOptions,
    state: Arc<super::Inner>,
    mut stop: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
) {
    let m = &state.metrics;
    m.connections.inc();
    let _open = Open(m);
    // Answers are small and written in one go: no reason to let Nagle hold them
    // behind the client's delayed ACK.
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity::new(Instant::now()));
    let io = TokioIo::new(Watched {
        stream,
        activity: activity.clone(),
    });
    let service = Tracked {
        router: TowerToHyperService::new(router),
        activity: activity.clone(),
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(o.idle_timeout)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let mut stopping = *stop.borrow();
    if stopping {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        let deadline = activity.deadline(&o, stopping);
        let sleep = async {
            match deadline {
                Some((at, _)) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    if e.is_timeout() {
                        // hyper's own clock: no head within the idle deadline.
                        m.closed(Closed::IdleTimeout);
                    } else {
                        tracing::debug!(error = %e, "rest connection ended with an error");
                    }
                }
                return;
            }
            () = sleep => {
                // The phase may have moved since the deadline was computed.
                if let Some((at, why)) = activity.deadline(&o, stopping) {
                    if at <= Instant::now() {
                        m.closed(why);
                        return;
                    }
                }
            }
            () = activity.changed.notified() => {}
            changed = stop.changed(), if !stopping => {
                // A dropped sender means the server is gone: stop as well.
                let _ = changed;
                stopping = true;
                // Closes it now if idle, after the answer if busy.
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Accept errors that concern one connection only (the client gave up between
/// its SYN and our accept): try the next at once.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// The cap that fits an open-file limit of `soft` (`None`: unlimited).
fn cap_for_limit(requested: usize, soft: Option<u64>) -> usize {
    let requested = requested.max(1);
    match soft {
        None => requested,
        Some(soft) => {
            let fits = usize::try_from(soft.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX);
            requested.min(fits).max(1)
        }
    }
}

/// `requested`, or less if the process cannot open that many files: the soft
/// `RLIMIT_NOFILE` is raised towards the hard one first (only as far as needed).
fn connection_cap(requested: usize) -> usize {
    #[cfg(unix)]
    {
        use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
        let limit = getrlimit(Resource::Nofile);
        let needed = u64::try_from(requested)
            .unwrap_or(u64::MAX)
            .saturating_add(FD_RESERVE);
        let mut soft = limit.current;
        if let Some(current) = soft.filter(|s| *s < needed) {
            let target = limit.maximum.map_or(needed, |hard| hard.min(needed));
            if target > current
                && setrlimit(
                    Resource::Nofile,
                    Rlimit {
                        current: Some(target),
                        maximum: limit.maximum,
                    },
                )
                .is_ok()
            {
                tracing::debug!(from = current, to = target, "raised the open-file limit");
                soft = Some(target);
            }
        }
        let cap = cap_for_limit(requested, soft);
        if cap < requested {
            tracing::warn!(
                requested,
                cap,
                open_file_limit = soft,
                "--max-connections lowered to fit the open-file limit"
            );
        }
        cap
    }
    #[cfg(not(unix))]
    {
        cap_for_limit(requested, None)
    }
}

/// Accepts on `listener` and serves `router` until `shutdown` resolves, then
/// drains (see the module docs).
pub(super) async fn run(
    listener: TcpListener,
    router: Router,
    state: Arc<super::Inner>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let o = state.options.serve;
    let cap = connection_cap(o.max_connections);
    let slots = Arc::new(Semaphore::new(cap));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut last_accept_warning: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        tasks.spawn(connection(
                            stream,
                            router.clone(),
                            o,
                            state.clone(),
                            stop_rx.clone(),
                            slot,
                        ));
                    }
                    Err(_) => {
                        state.metrics.closed(Closed::OverLimit);
                        drop(stream);
                    }
                },
                Err(e) if is_connection_error(&e) => {}
                Err(e) => {
                    // Out of file descriptors or the like: back off a little
                    // rather than spin; say so at most once a second.
                    let quiet = last_accept_warning
                        .is_some_and(|t| t.elapsed() < Duration::from_secs(1));
                    if !quiet {
                        tracing::warn!(error = %e, "rest front cannot accept connections");
                        last_accept_warning = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    // New connections are refused by the kernel from here on.
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(o.shutdown_grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = tasks.len(),
            "shutdown grace over: closing the connections still open"
        );
        let open = u64::try_from(tasks.len()).unwrap_or(u64::MAX);
        state.metrics.closed_by(Closed::Shutdown, open);
        tasks.shutdown().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_fits_the_file_limit() {
        assert_eq!(cap_for_limit(1024, None), 1024);
        assert_eq!(cap_for_limit(1024, Some(1_048_576)), 1024);
        assert_eq!(cap_for_limit(1024, Some(1024 + FD_RESERVE)), 1024);
        assert_eq!(cap_for_limit(1024, Some(1024)), 1024 - 32);
        assert_eq!(cap_for_limit(1024, Some(64)), 32);
        assert_eq!(cap_for_limit(1024, Some(10)), 1);
        assert_eq!(cap_for_limit(0, None), 1);
    }

    #[test]
    fn deadlines_follow_the_phase() {
        let o = ServeOptions::default();
        let t0 = Instant::now();
        let a = Activity::new(t0);
        assert_eq!(
            a.deadline(&o, false),
            Some((t0 + o.header_timeout, Closed::HeaderTimeout))
        );
        assert_eq!(a.deadline(&o, true).map(|d| d.1), Some(Closed::Shutdown));
        a.set_phase(Phase::Busy);
        // Body bytes of the request being served are not a new head.
        a.moved(true);
        assert_eq!(a.deadline(&o, false), None);
        assert_eq!(a.deadline(&o, true), None);
        let a = Arc::new(a);
        drop(BusyGuard(a.clone()));
        let (at, why) = a.deadline(&o, false).unwrap();
        assert_eq!(why, Closed::IdleTimeout);
        assert!(at >= t0 + o.idle_timeout);
        // Writing the answer keeps it idle; the next request's first byte
        // starts a head.
        a.moved(false);
        assert_eq!(
            a.deadline(&o, false).map(|d| d.1),
            Some(Closed::IdleTimeout)
        );
        a.moved(true);
        assert_eq!(
            a.deadline(&o, false).map(|d| d.1),
            Some(Closed::HeaderTimeout)
        );
    }
}
