//! [`Rate`]: at most so many answers per second, for endpoints whose answers are large.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Counts answers in one-second windows.
#[derive(Debug)]
pub(crate) struct Rate {
    per_second: u32,
    /// The start of the current window and the answers given in it.
    window: Mutex<Option<(Instant, u32)>>,
}

impl Rate {
    /// At most `per_second` answers per second (at least 1).
    pub(crate) fn new(per_second: u32) -> Self {
        Self {
            per_second: per_second.max(1),
            window: Mutex::new(None),
        }
    }

    /// The most answers per second.
    pub(crate) fn per_second(&self) -> u32 {
        self.per_second
    }

    /// Takes one answer of the current second, or says how long until the next second.
    pub(crate) fn acquire(&self) -> Result<(), Duration> {
        const SECOND: Duration = Duration::from_secs(1);
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match &mut *window {
            Some((start, count)) if now.duration_since(*start) < SECOND => {
                if *count >= self.per_second {
                    return Err(SECOND - now.duration_since(*start));
                }
                *count += 1;
            }
            other => *other = Some((now, 1)),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_so_many_per_second() {
        let rate = Rate::new(2);
        assert!(rate.acquire().is_ok());
        assert!(rate.acquire().is_ok());
        let wait = rate.acquire().unwrap_err();
        assert!(wait <= Duration::from_secs(1));
        let one = Rate::new(0);
        assert!(one.acquire().is_ok(), "at least one per second");
        assert!(one.acquire().is_err());
    }
}
