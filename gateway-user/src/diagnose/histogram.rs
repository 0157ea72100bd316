//! The compact SYN-RTT histogram `gateway diagnose` prints under a target's text report when
//! the kernel measured enough handshakes: one line per power-of-two bucket, from the fastest
//! to the slowest non-empty one (a run of empty buckets in between is one line), with a bar
//! scaled to the fullest. A bimodal path (most
//! handshakes in 100 µs, a few after a 1 s SYN retransmit) shows at a glance, which p50/p99
//! alone hide.

use std::fmt::Write as _;

/// A bucket bound, short: `64µs`, `4.1ms`, `524ms`, `1.05s`.
fn short(us: u64) -> String {
    if us < 1000 {
        format!("{us}µs")
    } else if us < 10_000 {
        format!("{:.1}ms", us as f64 / 1e3)
    } else if us < 1_000_000 {
        format!("{}ms", us / 1000)
    } else {
        format!("{:.2}s", us as f64 / 1e6)
    }
}

/// Fewer samples than this draw no histogram: the percentiles already say everything.
pub const MIN_SAMPLES: usize = 5;
/// The fullest bucket's bar, in characters.
const BAR: usize = 24;

/// Lines (each indented by four spaces and ending in a newline) for `samples_us`, or `None`
/// below [`MIN_SAMPLES`].
pub fn render(samples_us: &[u64]) -> Option<String> {
    if samples_us.len() < MIN_SAMPLES {
        return None;
    }
    // Bucket k holds [2^k, 2^(k+1)) µs; 0 µs goes with 1 µs.
    let bucket = |us: u64| 63 - us.max(1).leading_zeros() as usize;
    let mut counts = [0usize; 64];
    for &us in samples_us {
        counts[bucket(us)] += 1;
    }
    let lo = counts.iter().position(|&c| c > 0)?;
    let hi = counts.iter().rposition(|&c| c > 0)?;
    let max = counts[lo..=hi].iter().copied().max()?;
    // Rows: each non-empty bucket, and each run of empty ones as one row of 0.
    let mut rows: Vec<(usize, usize, usize)> = Vec::new();
    for (k, &c) in counts.iter().enumerate().take(hi + 1).skip(lo) {
        match rows.last_mut() {
            Some((_, end, 0)) if c == 0 => *end = k,
            _ => rows.push((k, k, c)),
        }
    }
    let label = |from: usize, to: usize| {
        format!(
            "{}–{}",
            short(1u64 << from),
            short(1u64.checked_shl(to as u32 + 1).unwrap_or(u64::MAX))
        )
    };
    let width = rows
        .iter()
        .map(|&(a, b, _)| label(a, b).chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for &(from, to, c) in &rows {
        // Eighths of a character, so that a bucket of one sample is still visible.
        let eighths = (c * BAR * 8).div_ceil(max);
        let mut bar = "█".repeat(eighths / 8);
        if eighths % 8 > 0 {
            bar.push(['▏', '▎', '▍', '▌', '▋', '▊', '▉'][eighths % 8 - 1]);
        }
        let _ = writeln!(out, "    {:>width$} {bar:<BAR$} {c}", label(from, to));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_few_samples_draw_nothing() {
        assert_eq!(render(&[80, 90, 100, 110]), None);
    }

    #[test]
    fn a_bimodal_path_shows_both_modes_and_the_gap() {
        // 18 handshakes near 100 µs, 2 after a 1 s SYN retransmit.
        let mut s = vec![100u64; 18];
        s.extend([1_000_150, 1_000_200]);
        let text = render(&s).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        // The two modes, and the empty buckets between them as one line.
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].ends_with(" 18"), "{text}");
        assert!(lines[0].contains("64µs–128µs"), "{text}");
        assert!(lines[0].contains(&"█".repeat(BAR)), "{text}");
        assert!(
            lines[1].contains("128µs–524ms") && lines[1].ends_with(" 0"),
            "{text}"
        );
        assert!(
            lines[2].contains("524ms–1.05s") && lines[2].ends_with(" 2"),
            "{text}"
        );
        // The small mode still gets a visible bar: 2/18 of 24 characters.
        assert!(lines[2].contains("██▊"), "{text}");
        for l in &lines {
            assert!(l.starts_with("    "), "{text}");
        }
    }

    #[test]
    fn one_bucket_is_one_line() {
        let text = render(&[70, 71, 72, 73, 74, 75]).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.ends_with(" 6\n"), "{text}");
    }
}
