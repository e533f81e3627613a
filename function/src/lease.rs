//! The broker's token as a lease on a stage's keys.
//!
//! A function's keys come with a signed `FunctionToken` whose issue and expiry the broker
//! sets from its `token_lifetime_ms`. The function holds them for that lifetime, counted
//! on its own monotonic clock from when it connected to the broker to attest, a moment
//! before the broker issued the token: its [`Lease`] never outlasts the broker's, and a
//! wall clock behind or ahead of the broker's (skew between machines, a clock set back)
//! neither stretches nor voids it. Halfway to the end the function attests again
//! (the cold start's path, with its backoff while the broker is unreachable) and, if the
//! broker releases the same stage key for the same version, takes the new token and its
//! later expiry. If the lease runs out first, or the broker refuses (a revoked model, a
//! changed policy) or releases other keys (a rotation), the function stops: the process
//! exits, dropping its keys with it, and the platform replaces it with a function whose
//! cold start attests afresh (and waits for the broker, with backoff, if it is still
//! away). Exiting rather than idling without serving is the simpler and safer choice:
//! nothing keeps keys the broker no longer vouches for, and the coordinator already
//! replaces a replica that answers UNAVAILABLE, so an idle one would be replaced anyway.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use shardseal_keys::FunctionToken;
use shardseal_proto::tls::{Pki, Role};

use crate::Error;
use crate::cold_start::{AttestedStage, ColdStartConfig, Released, attest_retrying, open_release};

/// When a stage's keys stop being vouched for, on this process's monotonic clock; read on
/// every request, renewed by [`keep_renewed`].
#[derive(Debug)]
pub(crate) struct Lease {
    /// The end, in milliseconds after [`origin`] (`u64::MAX`: never).
    ends_at_ms: AtomicU64,
}

/// The instant lease ends are counted from: the first time any is taken in this process.
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// `t` in milliseconds after [`origin`], rounded down: a lease ends no later than it said.
fn millis_after_origin(t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(origin()).as_millis()).unwrap_or(u64::MAX)
}

impl Lease {
    /// A lease that ends at `end`.
    pub(crate) fn until(end: Instant) -> Self {
        Self {
            ends_at_ms: AtomicU64::new(millis_after_origin(end)),
        }
    }

    /// A lease that never ends (a stage served without a broker, in tests).
    #[cfg(test)]
    pub(crate) fn forever() -> Self {
        Self {
            ends_at_ms: AtomicU64::new(u64::MAX),
        }
    }

    /// Whether the lease has run out.
    pub(crate) fn expired(&self) -> bool {
        self.remaining().is_zero()
    }

    /// How long the lease still runs.
    pub(crate) fn remaining(&self) -> Duration {
        let ends = self.ends_at_ms.load(Ordering::Acquire);
        Duration::from_millis(ends.saturating_sub(millis_after_origin(Instant::now())))
    }

    /// Moves the end to `end`, the end of a renewed lease.
    fn renew(&self, end: Instant) {
        self.ends_at_ms
            .store(millis_after_origin(end), Ordering::Release);
    }
}

/// When the lease `token` grants ends: its lifetime on the broker's clock (issue to
/// expiry), counted from `asked_at`, which must precede the issue (the function's
/// connection to the broker for that attestation). Neither clock's reading of the
/// calendar enters: only the broker's own difference and this process's monotonic clock.
pub(crate) fn lease_end(asked_at: Instant, token: &FunctionToken) -> Result<Instant, Error> {
    let lifetime = token
        .lifetime()
        .ok_or_else(|| Error::Broker("the function token expires before it was issued".into()))?;
    asked_at
        .checked_add(lifetime)
        .ok_or_else(|| Error::Broker("the function token's lifetime is out of range".into()))
}

/// Keeps the lease on `stage`'s keys renewed; returns only why it could not (the
/// function must then stop serving).
pub(crate) async fn keep_renewed(config: ColdStartConfig, stage: Arc<AttestedStage>) -> Error {
    let tls = match Pki::open(&config.pki_dir).and_then(|pki| pki.client_config(Role::Broker, None))
    {
        Ok(tls) => tls,
        Err(e) => return Error::Config(e.to_string()),
    };
    loop {
        let remaining = stage.lease.remaining();
        // Halfway: the other half is left for retries while the broker is away.
        tokio::time::sleep(remaining / 2).await;
        let expires_at = Instant::now() + remaining / 2;
        let renewed = match attest_retrying(&config, &tls, expires_at).await {
            Ok(attested) => open_release(&config, attested),
            Err(e) => Err(e),
        };
        let released = match renewed {
            Ok(released) => released,
            Err(e) if stage.lease_expired() || Instant::now() >= expires_at => {
                tracing::error!(error = %e, "key lease expired before the broker renewed it");
                return Error::LeaseExpired;
            }
            Err(e) => {
                tracing::error!(error = %e, "key lease renewal refused");
                return e;
            }
        };
        if let Err(e) = same_keys(&stage, &released) {
            tracing::error!(error = %e, "key lease renewal released other keys");
            return e;
        }
        let Released {
            token, lease_ends, ..
        } = released;
        *stage
            .token
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = token;
        stage.lease.renew(lease_ends);
        tracing::info!(
            expires_in_ms = u64::try_from(stage.lease.remaining().as_millis()).unwrap_or(u64::MAX),
            "key lease renewed"
        );
    }
}

/// A renewal keeps serving the loaded shard only if the broker released the keys this
/// process already holds: the same version and stage key.
fn same_keys(stage: &AttestedStage, released: &Released) -> Result<(), Error> {
    if released.release.version != stage.version.0
        || released.stage_key.public_key().as_bytes() != stage.stage_key.public_key().as_bytes()
    {
        return Err(Error::Broker(
            "the broker released other keys (a new version or rotated keys)".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardseal_attestation::{Measurement, ModelId, ModelVersion, StageIndex};

    fn token(issued_at_ms: u64, expires_at_ms: u64) -> FunctionToken {
        FunctionToken {
            model_id: ModelId::new("m").unwrap(),
            version: ModelVersion(1),
            stage: StageIndex(0),
            measurement: Measurement([1; 32]),
            ephemeral_key: hex::encode([1; 32]),
            issued_at_ms,
            expires_at_ms,
        }
    }

    /// A broker whose clock reads 1970 or 2100 grants the same one-minute lease: the end
    /// is the lifetime after the moment the function asked, whatever either calendar says
    /// (with the expiry read against this machine's wall clock, the first was over before
    /// it began and the second would have run for 75 years).
    #[test]
    fn a_lease_runs_its_lifetime_from_the_ask_whatever_the_clocks_read() {
        let asked_at = Instant::now();
        let minute = Duration::from_secs(60);
        for (issued, expires) in [(1_000, 61_000), (4_102_444_800_000, 4_102_444_860_000)] {
            let end = lease_end(asked_at, &token(issued, expires)).unwrap();
            assert_eq!(end, asked_at + minute);
            let lease = Lease::until(end);
            assert!(!lease.expired());
            assert!(lease.remaining() <= minute);
            assert!(lease.remaining() > minute - Duration::from_secs(10));
        }
    }

    #[test]
    fn a_token_that_expires_before_its_issue_grants_no_lease() {
        let refused = lease_end(Instant::now(), &token(61_000, 1_000)).unwrap_err();
        assert!(refused.to_string().contains("expires before it was issued"));
    }

    #[test]
    fn a_lease_expires_at_its_end_and_renewing_moves_the_end() {
        let lease = Lease::until(Instant::now());
        assert!(lease.expired());
        assert_eq!(lease.remaining(), Duration::ZERO);
        lease.renew(Instant::now() + Duration::from_secs(30));
        assert!(!lease.expired());
        assert!(lease.remaining() > Duration::from_secs(20));
        assert!(!Lease::forever().expired());
    }
}
