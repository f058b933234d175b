//! The subscriber against a real redis-server and recording stand-ins for
//! Envoy's control listener.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use ibex_companion::subscribe::{self, RetryPolicy, SubscribeConfig, Subscriber};
use redis::Commands;
use tokio::sync::oneshot;
use uuid::Uuid;

struct Running {
    base: String,
    subscriber: Subscriber,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    async fn start(config: SubscribeConfig) -> Running {
        let subscriber = Subscriber::new(config).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(subscribe::run(
            subscriber.clone(),
            Some(listener),
            async move {
                let _ = rx.await;
            },
        ));
        Running {
            base,
            subscriber,
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("subscriber did not stop")
            .unwrap()
            .unwrap();
    }
}

fn config(redis: &Redis, controls: &[&FakeControl], token: Option<&str>) -> SubscribeConfig {
    let mut c = SubscribeConfig::new(
        redis.url(),
        controls.iter().map(|c| c.url()),
        token.map(str::to_owned),
        "directive:",
    )
    .unwrap();
    c.ping_interval = Duration::from_millis(100);
    // These tests exercise DEL mode; tombstone mode (the default) has its own test.
    c.tombstone_ttl = None;
    c
}

const FLUSH: &str = "/ibex/v1/invalidate";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_deletes_the_key_then_posts_to_every_control_listener() {
    let redis = Redis::start();
    let a = FakeControl::start().await;
    let b = FakeControl::start().await;
    let sub = Running::start(config(&redis, &[&a, &b], Some("t0k3n"))).await;
    // The connect-time flush proves the subscription is live.
    a.wait_for(FLUSH, 1).await;
    b.wait_for(FLUSH, 1).await;

    let agent = Uuid::new_v4();
    let bystander = Uuid::new_v4();
    let mut conn = redis.conn();
    let _: () = conn.set(format!("directive:{agent}"), "old text").unwrap();
    let _: () = conn.set(format!("directive:{bystander}"), "keep").unwrap();
    let _: i64 = conn
        .publish(format!("ibex:directive:updates:{agent}"), "")
        .unwrap();

    let path = format!("/ibex/v1/invalidate/{agent}");
    a.wait_for(&path, 1).await;
    b.wait_for(&path, 1).await;
    // DEL happens before the POSTs.
    let exists: bool = conn.exists(format!("directive:{agent}")).unwrap();
    assert!(!exists);
    let exists: bool = conn.exists(format!("directive:{bystander}")).unwrap();
    assert!(exists);
    for seen in a.seen().into_iter().chain(b.seen()) {
        assert_eq!(seen.authorization.as_deref(), Some("Bearer t0k3n"));
    }

    // Malformed agent ids are counted and ignored.
    let _: i64 = conn.publish("ibex:directive:updates:nope", "").unwrap();
    let base = sub.base.clone();
    eventually(
        "invalid message counted",
        Duration::from_secs(10),
        || async {
            let n = read_metric(&base, r#"ibex_subscribe_messages_total{kind="invalid"}"#).await;
            (n == 1).then_some(())
        },
    )
    .await;
    assert_eq!(
        read_metric(&base, r#"ibex_subscribe_messages_total{kind="update"}"#).await,
        1
    );
    assert_eq!(
        read_metric(&base, "ibex_subscribe_invalidations_sent_total").await,
        4
    );
    assert_eq!(
        read_metric(&base, "ibex_subscribe_invalidation_failures_total").await,
        0
    );
    // Liveness pings on the subscription work and cause no reconnects.
    eventually("pings answered", Duration::from_secs(10), || async {
        (read_metric(&base, "ibex_subscribe_pings_total").await >= 2).then_some(())
    })
    .await;
    assert_eq!(
        read_metric(&base, "ibex_subscribe_reconnects_total").await,
        0
    );
    assert_eq!(read_metric(&base, "ibex_subscribe_connected").await, 1);
    assert_eq!(http_get(&format!("{base}/readyz")).await.0, 200);
    assert_eq!(http_get(&format!("{base}/healthz")).await.0, 200);
    assert_eq!(a.count(&path), 1);
    sub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_message_deletes_every_prefixed_key_and_posts_flush() {
    let redis = Redis::start();
    let a = FakeControl::start().await;
    let sub = Running::start(config(&redis, &[&a], None)).await;
    a.wait_for(FLUSH, 1).await;

    let mut conn = redis.conn();
    for _ in 0..1200 {
        let _: () = conn
            .set(format!("directive:{}", Uuid::new_v4()), "x")
            .unwrap();
    }
    let _: () = conn.set("other:key", "stays").unwrap();
    let _: i64 = conn.publish("ibex:directive:flush", "").unwrap();
    a.wait_for(FLUSH, 2).await;
    let left: Vec<String> = conn.keys("directive:*").unwrap();
    assert!(left.is_empty(), "{} keys left", left.len());
    let other: Option<String> = conn.get("other:key").unwrap();
    assert_eq!(other.as_deref(), Some("stays"));
    assert!(a.seen().iter().all(|s| s.authorization.is_none()));
    assert_eq!(
        read_metric(&sub.base, r#"ibex_subscribe_messages_total{kind="flush"}"#).await,
        1
    );
    sub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_targets_are_retried_then_counted() {
    let redis = Redis::start();
    // 503 twice, then 204: retried to success.
    let flaky = FakeControl::start_scripted(&[503, 503]).await;
    // 401: not retried.
    let denied = FakeControl::start_scripted(&[401]).await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut c = SubscribeConfig::new(
        redis.url(),
        [flaky.url(), denied.url(), dead],
        None,
        "directive:",
    )
    .unwrap();
    c.retry = RetryPolicy {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(50),
        deadline: Duration::from_millis(300),
    };
    let sub = Running::start(c).await;
    flaky.wait_for(FLUSH, 3).await;
    let base = sub.base.clone();
    eventually(
        "dead and denied targets counted",
        Duration::from_secs(10),
        || async {
            let n = read_metric(&base, "ibex_subscribe_invalidation_failures_total").await;
            (n == 2).then_some(())
        },
    )
    .await;
    assert_eq!(denied.count(FLUSH), 1, "401 is not retried");
    assert_eq!(
        read_metric(&base, "ibex_subscribe_invalidations_sent_total").await,
        1
    );
    sub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_reconnects_and_flushes_everything() {
    let redis = Redis::start();
    let a = FakeControl::start().await;
    let sub = Running::start(config(&redis, &[&a], None)).await;
    a.wait_for(FLUSH, 1).await;

    // Keys written while the subscriber might be away survive the restart
    // (SAVE + reload) and must be flushed after the reconnect.
    let agent = Uuid::new_v4();
    {
        let mut conn = redis.conn();
        let _: () = conn.set(format!("directive:{agent}"), "stale").unwrap();
        let _: String = redis::cmd("SAVE").query(&mut conn).unwrap();
    }
    redis.kill();
    let base = sub.base.clone();
    redis.resume();

    eventually("reconnected", Duration::from_secs(20), || async {
        let n = read_metric(&base, "ibex_subscribe_reconnects_total").await;
        (n >= 1).then_some(())
    })
    .await;
    a.wait_for(FLUSH, 2).await;
    let mut conn = redis.conn();
    eventually("stale key flushed", Duration::from_secs(10), || {
        let exists: bool = conn.exists(format!("directive:{agent}")).unwrap();
        async move { (!exists).then_some(()) }
    })
    .await;

    // The new subscription works.
    let _: i64 = conn
        .publish(format!("ibex:directive:updates:{agent}"), "")
        .unwrap();
    a.wait_for(&format!("/ibex/v1/invalidate/{agent}"), 1).await;
    assert_eq!(read_metric(&base, "ibex_subscribe_connected").await, 1);
    sub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_redis_that_is_down_at_start() {
    let redis = Redis::start();
    redis.kill();
    let a = FakeControl::start().await;
    let sub = Running::start(config(&redis, &[&a], None)).await;
    let base = sub.base.clone();
    assert_eq!(read_metric(&base, "ibex_subscribe_connected").await, 0);
    assert_eq!(http_get(&format!("{base}/readyz")).await.0, 503);
    redis.resume();
    a.wait_for(FLUSH, 1).await;
    assert_eq!(http_get(&format!("{base}/readyz")).await.0, 200);
    // The first successful connection is not a reconnect.
    assert_eq!(
        read_metric(&base, "ibex_subscribe_reconnects_total").await,
        0
    );
    assert_eq!(sub.subscriber.metrics().connected.get(), 1);
    sub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstone_mode_writes_tombstones_and_the_flush_markers() {
    let redis = Redis::start();
    let a = FakeControl::start().await;
    let mut c = config(&redis, &[&a], None);
    c.tombstone_ttl = Some(Duration::from_secs(10));
    let sub = Running::start(c).await;
    a.wait_for(FLUSH, 1).await;
    let mut conn = redis.conn();
    // The connect-time flush set the marker of every slot, with a TTL: the
    // one of an agent's key's slot among them.
    let agent = Uuid::new_v4();
    let key = format!("directive:{agent}");
    let ttl: i64 = conn
        .ttl(ibex_wire::flush_marker_for("directive:", &key))
        .unwrap();
    assert!((1..=10).contains(&ttl), "marker ttl {ttl}");
    let mut markers: Vec<String> = conn.keys("directive:__flush__*").unwrap();
    markers.sort();
    // Every slot's, and the single marker filters from before them check.
    let mut expected: Vec<String> = (0..ibex_wire::SLOTS)
        .map(|s| ibex_wire::flush_marker_key("directive:", s))
        .chain(["directive:__flush__".to_string()])
        .collect();
    expected.sort();
    assert_eq!(markers, expected);

    let _: () = conn.set(&key, "old text").unwrap();
    let _: i64 = conn
        .publish(format!("ibex:directive:updates:{agent}"), "")
        .unwrap();
    a.wait_for(&format!("/ibex/v1/invalidate/{agent}"), 1).await;
    let value: Vec<u8> = conn.get(&key).unwrap();
    assert_eq!(value, b"\0");
    let ttl: i64 = conn.ttl(&key).unwrap();
    assert!((1..=10).contains(&ttl), "tombstone ttl {ttl}");

    // A flush sweeps keys and tombstones but keeps (re-arms) the markers.
    let other = format!("directive:{}", Uuid::new_v4());
    let _: () = conn.set(&other, "x").unwrap();
    let _: i64 = conn.publish("ibex:directive:flush", "").unwrap();
    a.wait_for(FLUSH, 2).await;
    let mut left: Vec<String> = conn.keys("directive:*").unwrap();
    left.sort();
    assert_eq!(left, expected);
    sub.stop().await;
}
