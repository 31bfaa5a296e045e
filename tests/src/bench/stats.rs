//! Percentiles over latency samples.

use std::time::Duration;

/// The `p`-th percentile (0..=100) of `samples` by nearest rank; `None` when
/// there are no samples. Sorts `samples` in place.
pub fn percentile(samples: &mut [Duration], p: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    let index = rank.clamp(1, samples.len()) - 1;
    Some(samples[index])
}

/// Formats an optional duration in milliseconds with one decimal, `-` when absent.
pub fn fmt_ms(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("{:.1}", d.as_secs_f64() * 1000.0),
        None => "-".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn nearest_rank_percentiles() {
        let cases: &[(&[u64], f64, Option<u64>)] = &[
            (&[], 50.0, None),
            (&[7], 99.0, Some(7)),
            (&[5, 1, 3, 2, 4], 50.0, Some(3)),
            (&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 99.0, Some(10)),
            (&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0.0, Some(1)),
        ];
        for (input, p, want) in cases {
            let mut samples: Vec<Duration> = input.iter().map(|&v| ms(v)).collect();
            assert_eq!(percentile(&mut samples, *p), want.map(ms), "{input:?} p{p}");
        }
    }
}
