//! The REST front's counters and latency histogram, and their Prometheus text
//! for `/metrics`. Names and help texts are part of the operator's interface:
//! keep them stable. Labels are fixed strings chosen here (the command's verb,
//! the outcome); never a key, a value or a command name a client made up.

use crate::metrics::{Counter, Exposition, Gauge, Histogram, LATENCY_BUCKETS};

use super::command::Verb;

/// What a request is counted as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandLabel {
    /// One allowed command.
    Verb(Verb),
    /// `POST /pipeline`, whatever it holds.
    Pipeline,
    /// A command outside the allowlist (its name is not recorded).
    Other,
    /// No command was read: unauthorized, malformed or too large.
    None,
}

impl CommandLabel {
    const ALL: [CommandLabel; 8] = [
        CommandLabel::Verb(Verb::Get),
        CommandLabel::Verb(Verb::Set),
        CommandLabel::Verb(Verb::Del),
        CommandLabel::Verb(Verb::Eval),
        CommandLabel::Verb(Verb::Ping),
        CommandLabel::Pipeline,
        CommandLabel::Other,
        CommandLabel::None,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            CommandLabel::Verb(v) => v.label(),
            CommandLabel::Pipeline => "pipeline",
            CommandLabel::Other => "other",
            CommandLabel::None => "none",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|c| *c == self).unwrap_or(0)
    }
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 200: Redis answered (a pipeline counts here even when some of its
    /// commands got error replies).
    Ok,
    /// 400 carrying a Redis error reply.
    RedisError,
    /// 401.
    Unauthorized,
    /// 403: a command or script outside the allowlist.
    Forbidden,
    /// 400 or 413 before Redis was asked.
    BadRequest,
    /// 503: Redis unreachable or slower than `--redis-timeout-ms`.
    Unavailable,
}

impl Outcome {
    const ALL: [Outcome; 6] = [
        Outcome::Ok,
        Outcome::RedisError,
        Outcome::Unauthorized,
        Outcome::Forbidden,
        Outcome::BadRequest,
        Outcome::Unavailable,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::RedisError => "redis_error",
            Outcome::Unauthorized => "unauthorized",
            Outcome::Forbidden => "forbidden",
            Outcome::BadRequest => "bad_request",
            Outcome::Unavailable => "unavailable",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|o| *o == self).unwrap_or(0)
    }
}

/// Why the front closed a connection of its own accord.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Accepted past `--max-connections` and closed at once.
    OverLimit,
    /// A head not complete within `--header-timeout-ms`.
    HeaderTimeout,
    /// Nothing moved for `--idle-timeout-ms` while no request was served.
    IdleTimeout,
    /// Shutdown: no request in progress, or still open after the grace.
    Shutdown,
}

impl Closed {
    const ALL: [Closed; 4] = [
        Closed::OverLimit,
        Closed::HeaderTimeout,
        Closed::IdleTimeout,
        Closed::Shutdown,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Closed::OverLimit => "over_limit",
            Closed::HeaderTimeout => "header_timeout",
            Closed::IdleTimeout => "idle_timeout",
            Closed::Shutdown => "shutdown",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|c| *c == self).unwrap_or(0)
    }
}

/// Counters of the REST front, exported on `/metrics`.
#[derive(Debug)]
pub struct RestMetrics {
    requests: [[Counter; 6]; 8],
    /// Commands sent inside pipelines.
    pub pipeline_commands: Counter,
    /// Requests being served right now.
    pub in_flight: Gauge,
    /// Times the front dropped its Redis connection to make a new one (after
    /// repeated timeouts or a non-I/O failure; the connection's own reconnects
    /// after a dropped link are not counted).
    pub redis_resets: Counter,
    /// Latency of every command request, from after authentication to the
    /// answer.
    pub latency: Histogram,
    /// Client connections open right now.
    pub connections: Gauge,
    closed: [Counter; 4],
}

impl Default for RestMetrics {
    fn default() -> Self {
        Self {
            requests: Default::default(),
            pipeline_commands: Counter::default(),
            in_flight: Gauge::default(),
            redis_resets: Counter::default(),
            latency: Histogram::new(LATENCY_BUCKETS),
            connections: Gauge::default(),
            closed: Default::default(),
        }
    }
}

impl RestMetrics {
    /// Counts one finished request.
    pub fn record(&self, command: CommandLabel, outcome: Outcome) {
        if let Some(c) = self
            .requests
            .get(command.index())
            .and_then(|row| row.get(outcome.index()))
        {
            c.inc();
        }
    }

    /// Requests counted under `command` and `outcome` so far.
    pub fn requests(&self, command: CommandLabel, outcome: Outcome) -> u64 {
        self.requests
            .get(command.index())
            .and_then(|row| row.get(outcome.index()))
            .map_or(0, Counter::get)
    }

    /// Counts one connection the front closed.
    pub fn closed(&self, why: Closed) {
        self.closed_by(why, 1);
    }

    /// Counts `n` connections the front closed.
    pub fn closed_by(&self, why: Closed, n: u64) {
        if let Some(c) = self.closed.get(why.index()) {
            c.inc_by(n);
        }
    }

    /// Connections closed for `why` so far.
    pub fn closed_total(&self, why: Closed) -> u64 {
        self.closed.get(why.index()).map_or(0, Counter::get)
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut e = Exposition::new();
        let name = "ibex_rest_requests_total";
        e.family(
            name,
            "counter",
            "REST front requests by command (get, set, del, eval, ping, pipeline, other, none) and outcome.",
        );
        for command in CommandLabel::ALL {
            for outcome in Outcome::ALL {
                e.sample(
                    name,
                    &[("command", command.label()), ("outcome", outcome.label())],
                    self.requests(command, outcome),
                );
            }
        }
        e.counter(
            "ibex_rest_pipeline_commands_total",
            "Commands sent to Redis inside pipelines.",
            &self.pipeline_commands,
        )
        .counter(
            "ibex_rest_redis_resets_total",
            "Redis connections dropped by the front and made anew (repeated timeouts, non-I/O failures).",
            &self.redis_resets,
        )
        .gauge(
            "ibex_rest_in_flight",
            "REST requests being served.",
            &self.in_flight,
        )
        .histogram(
            "ibex_rest_request_seconds",
            "REST command latency, from after authentication to the answer.",
            &self.latency,
        )
        .gauge(
            "ibex_rest_connections",
            "Client connections open.",
            &self.connections,
        );
        let name = "ibex_rest_connections_closed_total";
        e.family(
            name,
            "counter",
            "Client connections the front closed: over_limit (past --max-connections), header_timeout, idle_timeout, shutdown.",
        );
        for why in Closed::ALL {
            e.sample(name, &[("reason", why.label())], self.closed_total(why));
        }
        e.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pair_is_rendered_and_counted_apart() {
        let m = RestMetrics::default();
        m.record(CommandLabel::Verb(Verb::Get), Outcome::Ok);
        m.record(CommandLabel::Verb(Verb::Get), Outcome::Ok);
        m.record(CommandLabel::None, Outcome::Unauthorized);
        let text = m.render();
        assert!(text.contains("ibex_rest_requests_total{command=\"get\",outcome=\"ok\"} 2\n"));
        assert!(text
            .contains("ibex_rest_requests_total{command=\"none\",outcome=\"unauthorized\"} 1\n"));
        assert!(text.contains(
            "ibex_rest_requests_total{command=\"pipeline\",outcome=\"unavailable\"} 0\n"
        ));
        assert_eq!(text.matches("ibex_rest_requests_total{").count(), 48);
        assert!(text.contains("# TYPE ibex_rest_request_seconds histogram\n"));
        assert!(text.contains("ibex_rest_in_flight 0\n"));
        m.closed(Closed::HeaderTimeout);
        m.closed_by(Closed::Shutdown, 3);
        let text = m.render();
        assert!(text.contains("ibex_rest_connections_closed_total{reason=\"header_timeout\"} 1\n"));
        assert!(text.contains("ibex_rest_connections_closed_total{reason=\"shutdown\"} 3\n"));
        assert!(text.contains("ibex_rest_connections_closed_total{reason=\"over_limit\"} 0\n"));
        assert!(text.contains("ibex_rest_connections 0\n"));
    }
}
