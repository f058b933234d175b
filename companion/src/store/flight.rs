//! Single flight for the store's lookups: lookups of one agent (or one key) that
//! arrive while a query for it still waits for a connection share that query, so a
//! slow Postgres is not asked the same thing by every request that piles up.
//!
//! It never shares a query that was already sent: a lookup that arrives later may
//! answer a request made after an update, and must see a snapshot taken after it.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::metrics::Counter;
use crate::DbFailure;

/// A query that lookups of one agent (or one key) may still join.
pub(super) struct Flight<V> {
    id: u64,
    result: watch::Receiver<Option<Result<V, DbFailure>>>,
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
            f.flights.close(f.key, f.id);
        }
    }
}

impl<K: Copy + Eq + Hash, V> SingleFlight<K, V> {
    pub(super) fn new(enabled: bool) -> Arc<Self> {
        Arc::new(Self {
            enabled,
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
    /// before it sends the statement.
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
        if !self.enabled {
            return query(OnDispatch(None)).await;
        }
        let mut rx = {
            let mut flights = self.flights();
            match flights.get(&key) {
                Some(flight) => {
                    coalesced.inc();
                    flight.result.clone()
                }
                None => {
                    let id = self.next_flight.fetch_add(1, Ordering::Relaxed);
                    let (tx, rx) = watch::channel(None);
                    flights.insert(
                        key,
                        Flight {
                            id,
                            result: rx.clone(),
                        },
                    );
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
                        // Also closes flights that failed before dispatch.
                        this.close(key, id);
                        let _ = tx.send(Some(result));
                    });
                    rx
                }
            }
        };
        let shared = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone(),
            Err(_) => None,
        };
        shared.unwrap_or_else(|| Err(DbFailure::Connection("lookup task ended early".into())))
    }
}
