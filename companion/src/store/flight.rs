//! Single flight for the store's lookups: lookups of one agent (or one key) that
//! arrive while a query for it still waits for a connection share that query, so a
//! slow Postgres is not asked the same thing by every request that piles up.
//!
//! By itself it never shares a query that was already sent: a lookup that arrives
//! later may answer a request made after an update, and must see a snapshot taken
//! after it. With a sharing window (directive lookups when the store reads Redis,
//! `super::guard`), a sent query stays joinable while it runs and for the window
//! after its answer, but only for a lookup whose check, made after it arrived, finds
//! no invalidation since (Redis holds no tombstone of the agent and no flush
//! marker); a lookup whose check fails leads a new flight, which the lookups after it
//! join as usual. So the Envoys of a fleet that miss Redis for a cold agent at
//! slightly different moments, before the first answer was written back, cost
//! Postgres one query.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::metrics::Counter;
use crate::DbFailure;

/// A query that lookups of one agent (or one key) may still join.
pub(super) struct Flight<V> {
    id: u64,
    result: watch::Receiver<Option<Result<V, DbFailure>>>,
    /// Its query was sent (or answered): with a sharing window, only lookups whose
    /// check passes may still share it; without one, it is no longer in the map.
    sent: bool,
}

/// The counters of one kind of lookup's sharing.
pub(super) struct Sharing<'a> {
    /// Lookups that joined a query not yet sent.
    pub coalesced: &'a Counter,
    /// Lookups that shared a query already sent (or answered within the window)
    /// after their check passed.
    pub shared_late: &'a Counter,
    /// Lookups that found a sent query but whose check failed: they ran their own.
    pub refused: &'a Counter,
}

/// Where a lookup sits.
enum Seat<V> {
    /// It started the flight, or joined one not yet sent: it takes the result.
    Taken(watch::Receiver<Option<Result<V, DbFailure>>>),
    /// It found a sent flight: it takes the result only if its check passes.
    Late(watch::Receiver<Option<Result<V, DbFailure>>>),
}

/// Single flight for one kind of lookup: joinable queries, by what is looked
/// up (an agent id, a key hash).
///
/// An entry is removed the moment its query is sent to Postgres: a lookup that
/// arrives later may be answering a request made after a directive (or key)
/// update, so it must get a snapshot taken after its own arrival, i.e. a query
/// of its own. Sharing is therefore limited to lookups that arrived while the
/// first one was still waiting for a connection, which is exactly the pile-up
/// to absorb when Postgres is slow.
pub(super) struct SingleFlight<K, V> {
    /// Off: every lookup runs its own query.
    enabled: bool,
    /// How long a sent query stays joinable after its answer (for lookups whose
    /// check passes); `None`: it stops taking joiners when it is sent.
    window: Option<Duration>,
    flights: Mutex<HashMap<K, Flight<V>>>,
    next_flight: AtomicU64,
}

/// Handed to a lookup's query: closes the flight it runs for, if any, just
/// before the statement is sent.
pub(super) struct OnDispatch<K, V>(Option<FlightRef<K, V>>);

/// Which flight an [`OnDispatch`] closes.
pub(super) struct FlightRef<K, V> {
    flights: Arc<SingleFlight<K, V>>,
    key: K,
    id: u64,
}

impl<K: Copy + Eq + Hash, V> OnDispatch<K, V> {
    pub(super) fn fire(self) {
        if let Some(f) = self.0 {
            f.flights.sent(f.key, f.id);
        }
    }
}

impl<K: Copy + Eq + Hash, V> SingleFlight<K, V> {
    /// Single flight (`enabled`), sharing sent queries for `window` after their
    /// answer when given.
    pub(super) fn new(enabled: bool, window: Option<Duration>) -> Arc<Self> {
        Arc::new(Self {
            enabled,
            window,
            flights: Mutex::new(HashMap::new()),
            next_flight: AtomicU64::new(0),
        })
    }

    fn flights(&self) -> std::sync::MutexGuard<'_, HashMap<K, Flight<V>>> {
        // The map stays consistent even if a holder panicked: every critical
        // section is a single insert, lookup or remove.
        self.flights
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `key`'s flight `id` was sent: without a window it takes no more joiners;
    /// with one, only lookups whose check passes.
    fn sent(&self, key: K, id: u64) {
        if self.window.is_none() {
            return self.close(key, id);
        }
        if let Some(f) = self.flights().get_mut(&key).filter(|f| f.id == id) {
            f.sent = true;
        }
    }

    /// Stops `key`'s flight `id` from accepting joiners, unless a newer flight
    /// already replaced it.
    fn close(&self, key: K, id: u64) {
        let mut flights = self.flights();
        if flights.get(&key).is_some_and(|f| f.id == id) {
            flights.remove(&key);
        }
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Copy + Eq + Hash + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Answers a lookup of `key` with `query`, or, while a query for the same
    /// key is still waiting for a connection, with that query's result
    /// (counted in `coalesced`). `query` must fire its [`OnDispatch`] just
    /// before it sends the statement. Without a window no sent query is shared.
    pub(super) async fn lookup<Q, Fut>(
        self: &Arc<Self>,
        key: K,
        coalesced: &Counter,
        query: Q,
    ) -> Result<V, DbFailure>
    where
        Q: FnOnce(OnDispatch<K, V>) -> Fut,
        Fut: Future<Output = Result<V, DbFailure>> + Send + 'static,
    {
        let unused = Counter::default();
        let sharing = Sharing {
            coalesced,
            shared_late: &unused,
            refused: &unused,
        };
        self.lookup_checked(key, &sharing, || async { false }, query)
            .await
    }

    /// As [`SingleFlight::lookup`], and with a window: a lookup that finds `key`'s
    /// query already sent (or answered less than the window ago) shares it when
    /// `check`, run after the lookup arrived, says nothing invalidated `key` since;
    /// otherwise it starts a flight of its own, which later lookups join.
    pub(super) async fn lookup_checked<C, CFut, Q, Fut>(
        self: &Arc<Self>,
        key: K,
        sharing: &Sharing<'_>,
        check: C,
        query: Q,
    ) -> Result<V, DbFailure>
    where
        C: FnOnce() -> CFut,
        CFut: Future<Output = bool>,
        Q: FnOnce(OnDispatch<K, V>) -> Fut,
        Fut: Future<Output = Result<V, DbFailure>> + Send + 'static,
    {
        if !self.enabled {
            return query(OnDispatch(None)).await;
        }
        let mut query = Some(query);
        let seat = {
            let mut flights = self.flights();
            match flights.get(&key) {
                Some(flight) if !flight.sent => {
                    sharing.coalesced.inc();
                    Seat::Taken(flight.result.clone())
                }
                Some(flight) => Seat::Late(flight.result.clone()),
                None => Seat::Taken(self.start(&mut flights, key, &mut query)),
            }
        };
        let rx = match seat {
            Seat::Taken(rx) => rx,
            Seat::Late(rx) => {
                if check().await {
                    sharing.shared_late.inc();
                    return Self::result(rx).await;
                }
                sharing.refused.inc();
                // A flight of our own (replacing the sent one), or one not yet sent.
                let mut flights = self.flights();
                match flights.get(&key) {
                    Some(flight) if !flight.sent => {
                        sharing.coalesced.inc();
                        flight.result.clone()
                    }
                    _ => self.start(&mut flights, key, &mut query),
                }
            }
        };
        Self::result(rx).await
    }

    /// Puts a new flight for `key` into `flights` (replacing a sent one) and runs
    /// `query` for it in a task of its own; the receiver of its result.
    fn start<Q, Fut>(
        self: &Arc<Self>,
        flights: &mut HashMap<K, Flight<V>>,
        key: K,
        query: &mut Option<Q>,
    ) -> watch::Receiver<Option<Result<V, DbFailure>>>
    where
        Q: FnOnce(OnDispatch<K, V>) -> Fut,
        Fut: Future<Output = Result<V, DbFailure>> + Send + 'static,
    {
        let id = self.next_flight.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        flights.insert(
            key,
            Flight {
                id,
                result: rx.clone(),
                sent: false,
            },
        );
        let Some(query) = query.take() else {
            // A lookup starts at most one flight; never reached.
            let _ = tx.send(Some(Err(DbFailure::Connection(
                "lookup started twice".into(),
            ))));
            return rx;
        };
        // The query runs in its own task so that a leader whose
        // client disconnects does not cancel it for the others.
        let run = query(OnDispatch(Some(FlightRef {
            flights: Arc::clone(self),
            key,
            id,
        })));
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let result = run.await;
            // A failed query is never shared late; it also closes flights that
            // failed before dispatch.
            let keep = this.window.filter(|_| result.is_ok());
            if keep.is_none() {
                this.close(key, id);
            }
            let _ = tx.send(Some(result));
            if let Some(window) = keep {
                tokio::time::sleep(window).await;
                this.close(key, id);
            }
        });
        rx
    }

    async fn result(mut rx: watch::Receiver<Option<Result<V, DbFailure>>>) -> Result<V, DbFailure> {
        let shared = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone(),
            Err(_) => None,
        };
        shared.unwrap_or_else(|| Err(DbFailure::Connection("lookup task ended early".into())))
    }
}
