//! Reconnect delays: exponential backoff with full jitter.
//!
//! Attempt `n` (counting from 0) waits a uniformly random time in `[0, min(max, initial * 2^n)]`
//! ("full jitter"), so clients that lost the server together do not come back together. The
//! random source is seeded, so a test can replay a sequence of delays.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The shape of the reconnect delays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackoffConfig {
    /// The ceiling of the first delay.
    pub initial: Duration,
    /// The largest ceiling; no delay is longer.
    pub max: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(30),
        }
    }
}

/// Draws reconnect delays. See the [module docs](self).
#[derive(Debug)]
pub struct Backoff {
    config: BackoffConfig,
    rng: StdRng,
}

impl Backoff {
    /// A backoff drawing from a generator seeded with `seed`.
    pub fn new(config: BackoffConfig, seed: u64) -> Self {
        Self {
            config,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The ceiling for attempt `attempt` (0 is the first retry): `min(max, initial * 2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.config
            .initial
            .checked_mul(factor)
            .unwrap_or(self.config.max)
            .min(self.config.max)
    }

    /// The delay before retry `attempt`: uniform in `[0, ceiling(attempt)]`.
    pub fn delay(&mut self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt).as_nanos().min(u64::MAX as u128) as u64;
        Duration::from_nanos(self.rng.random_range(0..=ceiling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BackoffConfig {
        BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }

    #[test]
    fn ceilings_double_up_to_the_bound() {
        let backoff = Backoff::new(config(), 1);
        assert_eq!(backoff.ceiling(0), Duration::from_millis(100));
        assert_eq!(backoff.ceiling(1), Duration::from_millis(200));
        assert_eq!(backoff.ceiling(5), Duration::from_millis(3200));
        assert_eq!(backoff.ceiling(6), Duration::from_secs(5));
        assert_eq!(backoff.ceiling(u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn delays_are_full_jitter_within_the_ceiling_and_seeded() {
        let mut a = Backoff::new(config(), 7);
        let mut b = Backoff::new(config(), 7);
        let mut distinct = std::collections::BTreeSet::new();
        for attempt in 0..64 {
            let delay = a.delay(attempt);
            assert!(delay <= a.ceiling(attempt));
            assert_eq!(delay, b.delay(attempt), "same seed, same delays");
            distinct.insert(delay);
        }
        assert!(distinct.len() > 32, "jittered, not fixed");
        // Full jitter: late attempts spread over the whole range, some well under half the max.
        let low = (0..200)
            .filter(|_| a.delay(40) < Duration::from_millis(2500))
            .count();
        assert!((50..150).contains(&low), "{low} of 200 under half");
    }
}
