//! Per-stage autoscaling: how many replicas a stage should have, from the load it carries.
//!
//! The rule is Knative's concurrency rule, per stage: a stage whose requests in flight
//! (being processed, plus waiting for a replica) average `c` over the stable window wants
//! `ceil(c / target_in_flight)` replicas, within `[min_replicas, max_replicas]`. A burst
//! scales out at once (the current load counts as soon as it is seen); scaling in follows
//! the window's average, so a stage does not flap. A stage that has carried nothing for
//! `scale_to_zero_after` goes to zero replicas (when `min_replicas` is 0); its next request
//! starts one and waits for it, like Knative's activator.
//!
//! Each stage scales on its own load, so a slow stage (more time per request, hence more
//! requests in flight) gets more replicas than a fast one without any configuration.
//!
//! This module decides; the router acts (starts, drains and stops replicas).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How replicas follow load.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalingPolicy {
    /// Replicas a stage keeps even when idle (0 allows scale to zero).
    pub min_replicas: usize,
    /// Replicas a stage never exceeds.
    pub max_replicas: usize,
    /// Requests in flight per replica the scaler aims for (Knative's target concurrency).
    pub target_in_flight: f64,
    /// The window load is averaged over before scaling in.
    pub stable_window: Duration,
    /// Idle time after which a stage goes to zero replicas (`None`: never; only applies
    /// when `min_replicas` is 0).
    pub scale_to_zero_after: Option<Duration>,
    /// How often the scaler samples load and acts.
    pub tick: Duration,
}

impl Default for ScalingPolicy {
    /// One replica can serve one request at a time (tract runs one request per thread), up
    /// to 4 replicas per stage, a 10 s window, zero replicas after 60 s without a request.
    fn default() -> Self {
        Self {
            min_replicas: 0,
            max_replicas: 4,
            target_in_flight: 1.0,
            stable_window: Duration::from_secs(10),
            scale_to_zero_after: Some(Duration::from_secs(60)),
            tick: Duration::from_millis(250),
        }
    }
}

impl ScalingPolicy {
    /// Checks the policy makes sense, naming the field that does not.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_replicas == 0 {
            return Err("max_replicas must be at least 1".into());
        }
        if self.min_replicas > self.max_replicas {
            return Err(format!(
                "min_replicas ({}) exceeds max_replicas ({})",
                self.min_replicas, self.max_replicas
            ));
        }
        if !(self.target_in_flight.is_finite() && self.target_in_flight > 0.0) {
            return Err("target_in_flight must be a positive number".into());
        }
        if self.tick.is_zero() {
            return Err("tick must be positive".into());
        }
        Ok(())
    }
}

/// One stage's load history, and the scaling decision it leads to.
#[derive(Debug)]
pub struct StageScaler {
    samples: VecDeque<(Instant, usize)>,
    /// When a request last touched the stage; `None` for a stage deployed with no replica
    /// that has carried nothing yet.
    last_busy: Option<Instant>,
}

impl StageScaler {
    /// A stage deployed with replicas at `now`: warm, as if just busy, so it keeps one
    /// replica for `scale_to_zero_after` even if no request comes.
    pub fn new(now: Instant) -> Self {
        Self {
            samples: VecDeque::new(),
            last_busy: Some(now),
        }
    }

    /// A stage deployed with no replica: it stays at `min_replicas` (zero by default)
    /// until its first request.
    pub fn idle() -> Self {
        Self {
            samples: VecDeque::new(),
            last_busy: None,
        }
    }

    /// Records that a request touched the stage at `now` (so an idle timer restarts even
    /// when ticks miss a short request).
    pub fn touch(&mut self, now: Instant) {
        self.last_busy = Some(self.last_busy.map_or(now, |busy| busy.max(now)));
    }

    /// Records the stage's load at `now` (requests in flight plus requests waiting for a
    /// replica) and returns how many replicas it should have.
    pub fn desired(&mut self, policy: &ScalingPolicy, now: Instant, load: usize) -> usize {
        if load > 0 {
            self.touch(now);
        }
        self.samples.push_back((now, load));
        while let Some(&(at, _)) = self.samples.front() {
            if now.saturating_duration_since(at) > policy.stable_window {
                self.samples.pop_front();
            } else {
                break;
            }
        }
        let average = self.samples.iter().map(|&(_, l)| l as f64).sum::<f64>()
            / self.samples.len().max(1) as f64;
        let wanted = (average.max(load as f64) / policy.target_in_flight).ceil() as usize;
        let floor = match (self.last_busy, policy.scale_to_zero_after) {
            // Never busy since it was deployed without replicas.
            (None, _) => policy.min_replicas,
            (Some(busy), Some(after))
                if policy.min_replicas == 0 && now.saturating_duration_since(busy) >= after =>
            {
                0
            }
            // Scaled from zero and not idle long enough: keep the replica warm.
            _ => policy.min_replicas.max(1),
        };
        wanted.clamp(floor, policy.max_replicas.max(floor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> ScalingPolicy {
        ScalingPolicy {
            min_replicas: 0,
            max_replicas: 5,
            target_in_flight: 2.0,
            stable_window: Duration::from_secs(10),
            scale_to_zero_after: Some(Duration::from_secs(30)),
            tick: Duration::from_millis(100),
        }
    }

    #[test]
    fn a_burst_scales_out_at_once_within_the_maximum() {
        let p = policy();
        let t0 = Instant::now();
        let mut s = StageScaler::new(t0);
        assert_eq!(s.desired(&p, t0, 0), 1);
        assert_eq!(s.desired(&p, t0 + Duration::from_secs(1), 7), 4);
        assert_eq!(s.desired(&p, t0 + Duration::from_secs(2), 40), 5);
    }

    #[test]
    fn scaling_in_follows_the_window_average() {
        let p = policy();
        let t0 = Instant::now();
        let mut s = StageScaler::new(t0);
        for i in 0..10 {
            s.desired(&p, t0 + Duration::from_secs(i), 8);
        }
        // The load stopped: the window still remembers it.
        let after = t0 + Duration::from_secs(10);
        let soon = s.desired(&p, after, 0);
        assert!((2..=4).contains(&soon), "{soon}");
        // A whole window later the average is zero: one warm replica remains.
        assert_eq!(s.desired(&p, after + Duration::from_secs(11), 0), 1);
    }

    #[test]
    fn an_idle_stage_goes_to_zero_only_when_allowed() {
        let t0 = Instant::now();
        let mut s = StageScaler::new(t0);
        let p = policy();
        assert_eq!(s.desired(&p, t0 + Duration::from_secs(29), 0), 1);
        assert_eq!(s.desired(&p, t0 + Duration::from_secs(31), 0), 0);
        // A request touches it: warm again.
        s.touch(t0 + Duration::from_secs(40));
        assert_eq!(s.desired(&p, t0 + Duration::from_secs(41), 0), 1);

        let keep_one = ScalingPolicy {
            min_replicas: 1,
            ..policy()
        };
        let mut s = StageScaler::new(t0);
        assert_eq!(s.desired(&keep_one, t0 + Duration::from_secs(300), 0), 1);
        let never = ScalingPolicy {
            scale_to_zero_after: None,
            ..policy()
        };
        let mut s = StageScaler::new(t0);
        assert_eq!(s.desired(&never, t0 + Duration::from_secs(300), 0), 1);
    }

    #[test]
    fn a_stage_deployed_without_replicas_waits_for_its_first_request() {
        let t0 = Instant::now();
        let never = ScalingPolicy {
            scale_to_zero_after: None,
            ..policy()
        };
        for p in [policy(), never] {
            let mut s = StageScaler::idle();
            assert_eq!(s.desired(&p, t0, 0), 0);
            assert_eq!(s.desired(&p, t0 + Duration::from_secs(5), 0), 0);
            // The first request (waiting for a replica counts as load) starts one, and
            // from then on the stage is warm like any other.
            assert_eq!(s.desired(&p, t0 + Duration::from_secs(6), 1), 1);
            assert_eq!(s.desired(&p, t0 + Duration::from_secs(20), 0), 1);
        }
        let keep_two = ScalingPolicy {
            min_replicas: 2,
            ..policy()
        };
        assert_eq!(StageScaler::idle().desired(&keep_two, t0, 0), 2);
    }

    #[test]
    fn bad_policies_name_their_field() {
        let bad = ScalingPolicy {
            min_replicas: 3,
            max_replicas: 2,
            ..policy()
        };
        assert!(bad.validate().unwrap_err().contains("min_replicas"));
        let bad = ScalingPolicy {
            target_in_flight: 0.0,
            ..policy()
        };
        assert!(bad.validate().unwrap_err().contains("target_in_flight"));
        assert!(policy().validate().is_ok());
    }
}
