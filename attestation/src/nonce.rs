//! Broker nonces: random, single use, short-lived, and bounded in number.
//!
//! A nonce is what makes a quote fresh: the broker issues it, the function binds it into
//! its report data, and the broker consumes it when the evidence comes back. A quote
//! captured from one attestation therefore cannot be replayed in another.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom, SystemRandom};

use crate::error::AttestationError;

/// A 32-byte random challenge issued by a [`NonceRegistry`]. It is public (it travels to
/// the function in the clear); its value lies in being used only once.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Nonce([u8; 32]);

impl Nonce {
    /// Wraps bytes received from a peer (to be checked with [`NonceRegistry::consume`]).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Nonce({})", hex::encode(self.0))
    }
}

/// A source of monotonic time, injectable so that expiry is tested without sleeping.
pub trait Clock: Send + Sync {
    /// The current instant.
    fn now(&self) -> Instant;
}

/// The real monotonic clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told to, for tests of anything that expires.
#[derive(Debug)]
pub struct ManualClock {
    start: Instant,
    elapsed: Mutex<Duration>,
}

impl ManualClock {
    /// A clock standing at the moment it was made.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            elapsed: Mutex::new(Duration::ZERO),
        }
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let mut elapsed = self.elapsed.lock().unwrap_or_else(|e| e.into_inner());
        *elapsed += by;
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + *self.elapsed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<C: Clock + ?Sized> Clock for std::sync::Arc<C> {
    fn now(&self) -> Instant {
        (**self).now()
    }
}

/// How long a nonce stays usable unless configured otherwise.
pub const DEFAULT_NONCE_LIFETIME: Duration = Duration::from_secs(30);
/// How many nonces may be remembered at once unless configured otherwise.
pub const DEFAULT_MAX_OUTSTANDING_NONCES: usize = 10_000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum NonceState {
    Outstanding,
    Consumed,
}

#[derive(Debug)]
struct Entry {
    expires_at: Instant,
    state: NonceState,
}

#[derive(Debug, Default)]
struct Ledger {
    entries: HashMap<Nonce, Entry>,
    // Issue order is expiry order (one lifetime for all, monotonic clock), so purging
    // only ever pops from the front.
    by_expiry: VecDeque<(Instant, Nonce)>,
}

/// Issues nonces and accepts each exactly once before it expires. Safe to share between
/// tasks (`&self` methods, an internal lock held for microseconds).
///
/// Memory is bounded: an entry is forgotten one lifetime after it expired (until then a
/// late or repeated use is reported precisely as expired or reused; after that as unknown,
/// which is refused all the same), and at most `max_outstanding` entries are kept: beyond
/// that [`NonceRegistry::issue`] fails with
/// [`AttestationError::TooManyOutstandingNonces`] instead of growing.
pub struct NonceRegistry<C: Clock = SystemClock> {
    clock: C,
    lifetime: Duration,
    max_outstanding: usize,
    rng: SystemRandom,
    ledger: Mutex<Ledger>,
}

impl NonceRegistry<SystemClock> {
    /// A registry on the system clock with the default lifetime (30 s) and cap (10 000).
    pub fn new() -> Self {
        Self::with_clock(
            SystemClock,
            DEFAULT_NONCE_LIFETIME,
            DEFAULT_MAX_OUTSTANDING_NONCES,
        )
    }
}

impl Default for NonceRegistry<SystemClock> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C: Clock> NonceRegistry<C> {
    /// A registry with its own clock, lifetime and cap on remembered nonces.
    pub fn with_clock(clock: C, lifetime: Duration, max_outstanding: usize) -> Self {
        Self {
            clock,
            lifetime,
            max_outstanding,
            rng: SystemRandom::new(),
            ledger: Mutex::new(Ledger::default()),
        }
    }

    /// How long an issued nonce stays usable.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Issues a fresh random nonce, usable once within the lifetime.
    pub fn issue(&self) -> Result<Nonce, AttestationError> {
        let mut bytes = [0u8; 32];
        self.rng
            .fill(&mut bytes)
            .map_err(|_| AttestationError::Randomness)?;
        let nonce = Nonce(bytes);
        let now = self.clock.now();
        let mut ledger = self.lock();
        self.purge(&mut ledger, now);
        if ledger.entries.len() >= self.max_outstanding {
            return Err(AttestationError::TooManyOutstandingNonces {
                limit: self.max_outstanding,
            });
        }
        let expires_at = now + self.lifetime;
        ledger.entries.insert(
            nonce,
            Entry {
                expires_at,
                state: NonceState::Outstanding,
            },
        );
        ledger.by_expiry.push_back((expires_at, nonce));
        Ok(nonce)
    }

    /// Accepts a nonce once: the first use within its lifetime succeeds; a second use is
    /// [`AttestationError::NonceReused`], a late one [`AttestationError::NonceExpired`], one
    /// never issued here [`AttestationError::NonceUnknown`].
    pub fn consume(&self, nonce: &Nonce) -> Result<(), AttestationError> {
        let now = self.clock.now();
        let mut ledger = self.lock();
        self.purge(&mut ledger, now);
        let entry = ledger
            .entries
            .get_mut(nonce)
            .ok_or(AttestationError::NonceUnknown)?;
        match entry.state {
            NonceState::Consumed => Err(AttestationError::NonceReused),
            NonceState::Outstanding if now >= entry.expires_at => {
                Err(AttestationError::NonceExpired)
            }
            NonceState::Outstanding => {
                entry.state = NonceState::Consumed;
                Ok(())
            }
        }
    }

    /// How many nonces are remembered (outstanding, consumed, or recently expired).
    pub fn remembered(&self) -> usize {
        let now = self.clock.now();
        let mut ledger = self.lock();
        self.purge(&mut ledger, now);
        ledger.entries.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ledger> {
        // The ledger stays consistent even if a holder panicked: each update is one insert
        // or one state change.
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn purge(&self, ledger: &mut Ledger, now: Instant) {
        while let Some(&(expires_at, nonce)) = ledger.by_expiry.front() {
            if now < expires_at + self.lifetime {
                break;
            }
            ledger.by_expiry.pop_front();
            ledger.entries.remove(&nonce);
        }
    }
}

impl<C: Clock> fmt::Debug for NonceRegistry<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NonceRegistry")
            .field("lifetime", &self.lifetime)
            .field("max_outstanding", &self.max_outstanding)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn registry(max: usize) -> (Arc<ManualClock>, NonceRegistry<Arc<ManualClock>>) {
        let clock = Arc::new(ManualClock::new());
        let registry = NonceRegistry::with_clock(clock.clone(), Duration::from_secs(30), max);
        (clock, registry)
    }

    #[test]
    fn a_nonce_is_accepted_once() {
        let (_, registry) = registry(10);
        let nonce = registry.issue().unwrap();
        registry.consume(&nonce).unwrap();
        assert!(matches!(
            registry.consume(&nonce),
            Err(AttestationError::NonceReused)
        ));
    }

    #[test]
    fn nonces_are_random() {
        let (_, registry) = registry(10);
        assert_ne!(registry.issue().unwrap(), registry.issue().unwrap());
    }

    #[test]
    fn a_nonce_never_issued_is_unknown() {
        let (_, registry) = registry(10);
        registry.issue().unwrap();
        assert!(matches!(
            registry.consume(&Nonce::from_bytes([0; 32])),
            Err(AttestationError::NonceUnknown)
        ));
    }

    #[test]
    fn a_nonce_expires_at_the_end_of_its_lifetime() {
        let (clock, registry) = registry(10);
        let early = registry.issue().unwrap();
        let late = registry.issue().unwrap();
        clock.advance(Duration::from_secs(29));
        registry.consume(&early).unwrap();
        clock.advance(Duration::from_secs(1));
        assert!(matches!(
            registry.consume(&late),
            Err(AttestationError::NonceExpired)
        ));
        // Still remembered for one more lifetime, then forgotten (and so unknown).
        clock.advance(Duration::from_secs(29));
        assert!(matches!(
            registry.consume(&late),
            Err(AttestationError::NonceExpired)
        ));
        assert_eq!(registry.remembered(), 2);
        clock.advance(Duration::from_secs(1));
        assert_eq!(registry.remembered(), 0);
        assert!(matches!(
            registry.consume(&late),
            Err(AttestationError::NonceUnknown)
        ));
    }

    #[test]
    fn outstanding_nonces_are_capped_and_purging_frees_room() {
        let (clock, registry) = registry(3);
        for _ in 0..3 {
            registry.issue().unwrap();
        }
        assert!(matches!(
            registry.issue(),
            Err(AttestationError::TooManyOutstandingNonces { limit: 3 })
        ));
        clock.advance(Duration::from_secs(60));
        registry.issue().unwrap();
        assert_eq!(registry.remembered(), 1);
    }
}
