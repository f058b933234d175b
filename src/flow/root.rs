//! The root context's duties, on its tick and for the callouts it dispatched:
//! sending the queued L2 write-backs (from here their answers come back to a context
//! that lives as long as the VM, so every outcome is counted), and asking again for
//! fills whose owner went away (the SDK drops answers for contexts that are gone),
//! so that their participants are not stranded.

use super::{fill, Ctx};
use crate::host::Host;
use crate::metrics::Counter;
use crate::tiers::Response;
use crate::worker::Tier;

/// Root context, on its tick.
pub fn on_root_tick<H: Host>(ctx: &Ctx<'_, H>) {
    send_write_backs(ctx);
    let orphans = ctx.worker.borrow_mut().take_orphans();
    for (fill, ticket, tier) in orphans {
        fill::ask_again(fill, ticket, tier, ctx);
    }
}

/// Root context: a callout it dispatched answered (a rescued fill, or a write-back).
pub fn on_root_callout<H: Host>(token: u32, response: Response, ctx: &Ctx<'_, H>) {
    fill::on_callout(token, &response, ctx);
}

fn send_write_backs<H: Host>(ctx: &Ctx<'_, H>) {
    let writes = ctx.worker.borrow_mut().take_queued_writes();
    if ctx.worker.borrow_mut().breaker(Tier::Redis).is_open() {
        // Redis is down as far as this worker knows: a write would only wait for its
        // timeout. The answers are in L1; Redis is refilled once it is back.
        for _ in writes {
            ctx.host.count(Counter::L2WriteDropped);
        }
        return;
    }
    for write in writes {
        match ctx.host.dispatch(&write) {
            Ok(token) => {
                ctx.host.count(Counter::L2Write);
                ctx.worker.borrow_mut().track_write(token);
            }
            Err(_) => ctx.host.count(Counter::L2WriteError),
        }
    }
}
