//! The filter's counters (SPEC §7). Envoy shows them as `ibex_directive.<name>`
//! (Prometheus: `ibex_directive_<name>`); they are defined once per VM at configure
//! time and shared by every request.

macro_rules! counters {
    ($($variant:ident => $name:literal, $doc:literal;)*) => {
        /// A filter counter.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Counter {
            $(#[doc = $doc] $variant,)*
        }

        impl Counter {
            /// Every counter, in definition order (index = `self as usize`).
            pub const ALL: &'static [Counter] = &[$(Counter::$variant,)*];

            /// Full stat name as defined in Envoy.
            pub fn name(self) -> &'static str {
                match self {
                    $(Counter::$variant => concat!("ibex_directive.", $name),)*
                }
            }
        }
    };
}

counters! {
    Requests => "requests", "Requests seen by the data role.";
    L1Hit => "l1_hit", "Answered from shared data.";
    L1Miss => "l1_miss", "Shared data had no fresh entry.";
    L2Hit => "l2_hit", "Answered by Redis.";
    L2Miss => "l2_miss", "Redis had no key.";
    L2Error => "l2_error", "Redis callout failed or timed out.";
    L2Write => "l2_write", "Write-backs sent to Redis.";
    L2WriteError => "l2_write_error", "Write-backs that failed.";
    L2WriteDropped => "l2_write_dropped", "Write-backs not sent because the L2 circuit breaker is open.";
    L2WriteSkipped => "l2_write_skipped", "Write-backs refused because a tombstone, flush marker or value was there.";
    L3Hit => "l3_hit", "The store returned a directive.";
    L3None => "l3_none", "The store said the agent has none.";
    L3Error => "l3_error", "Store callout failed or timed out.";
    Injected => "injected", "Requests forwarded with the directive inserted.";
    NoDirective => "no_directive", "Requests of agents without a directive.";
    PassedThrough => "passed_through", "Requests with nothing to resolve (no agent, other path).";
    FailedOpen => "failed_open", "Forwarded without a directive because failure_mode is open.";
    StaleServed => "stale_served", "Answered from an expired entry while L2 and L3 failed.";
    FillDiscarded => "fill_discarded", "Fill results not cached because an invalidation overtook them.";
    Coalesced => "coalesced", "Requests that joined another request's fill instead of asking again.";
    L2Skipped => "l2_skipped", "L2 not asked because its circuit breaker is open.";
    L3Skipped => "l3_skipped", "L3 not asked because its circuit breaker is open.";
    L2BreakerOpen => "l2_breaker_open", "L2 circuit breaker opened (after repeated failures or a failed probe).";
    L2BreakerClose => "l2_breaker_close", "L2 circuit breaker closed (a probe succeeded).";
    L3BreakerOpen => "l3_breaker_open", "L3 circuit breaker opened.";
    L3BreakerClose => "l3_breaker_close", "L3 circuit breaker closed.";
    KeyL1Hit => "key_l1_hit", "api_key source: the key was answered locally (its shared-data entry, or this worker's memory of unknown keys).";
    KeyL1Miss => "key_l1_miss", "api_key source: shared data had no fresh entry for the key.";
    KeyL2Hit => "key_l2_hit", "api_key source: Redis answered for the key.";
    KeyL2Miss => "key_l2_miss", "api_key source: Redis had no entry for the key.";
    KeyL3Hit => "key_l3_hit", "api_key source: the store named the key's agent (an active key).";
    KeyL3None => "key_l3_none", "api_key source: the store knows no active key of that hash (unknown or revoked).";
    Invalidations => "invalidations", "Invalidations applied by the control role.";
    RejectedInvalidAgentId => "rejected.invalid_agent_id", "400: agent header not a UUID.";
    RejectedMissingAgentId => "rejected.missing_agent_id", "401: agent header missing.";
    RejectedInvalidApiKey => "rejected.invalid_api_key", "401: api_key source, key malformed, unknown or revoked.";
    RejectedUnsupportedPath => "rejected.unsupported_path", "404: a body on a path that is no format and not passed, or that cannot be read with certainty.";
    RejectedInvalidBody => "rejected.invalid_body", "400: body malformed or ambiguous, or ended in trailers while a directive was due.";
    RejectedBodyTooLarge => "rejected.body_too_large", "413: body over inject.max_body_bytes.";
    RejectedUnsupportedEncoding => "rejected.unsupported_encoding", "415: content-encoding not identity.";
    RejectedDirectiveUnavailable => "rejected.directive_unavailable", "503: directive unknowable, failure_mode closed.";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_prefixed() {
        let mut names: Vec<_> = Counter::ALL.iter().map(|c| c.name()).collect();
        assert!(names.iter().all(|n| n.starts_with("ibex_directive.")));
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Counter::ALL.len());
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}
