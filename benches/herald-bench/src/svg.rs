//! Plots as hand-written SVG: no font or system library is needed to make them, and any
//! browser or markdown viewer shows them.

use std::fmt::Write;

use hdrhistogram::Histogram;

const W: f64 = 760.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 40.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLORS: [&str; 5] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"];

/// One line of a chart.
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Points (x, y) in data units.
    pub points: Vec<(f64, f64)>,
}

/// How the x axis is drawn.
pub enum XAxis {
    /// Linear, labelled with numbers.
    Linear,
    /// Percentiles: x is `-log10(1 - q)` (0 = p0, 1 = p90, 2 = p99, 3 = p99.9 ...).
    Percentile,
}

fn nice_step(range: f64) -> f64 {
    let raw = (range / 5.0).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let r = raw / mag;
    mag * if r <= 1.0 {
        1.0
    } else if r <= 2.0 {
        2.0
    } else if r <= 5.0 {
        5.0
    } else {
        10.0
    }
}

fn fmt_num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A line chart.
pub fn chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    x_axis: XAxis,
    series: &[Series],
) -> String {
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1) = (0.0, 1.0);
    }
    if (x1 - x0).abs() < f64::EPSILON {
        x1 = x0 + 1.0;
    }
    let y_step = nice_step(if y1 > 0.0 { y1 } else { 1.0 });
    let y1 = (y1 / y_step).ceil().max(1.0) * y_step;
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| TOP + ph - y / y1 * ph;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>
"#,
        W / 2.0,
        esc(title)
    );
    // Horizontal grid and y labels.
    let mut y = 0.0;
    while y <= y1 + y_step / 2.0 {
        let py = sy(y);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            py + 4.0,
            fmt_num(y)
        );
        y += y_step;
    }
    // Vertical grid and x labels.
    let ticks: Vec<(f64, String)> = match x_axis {
        XAxis::Linear => {
            let step = nice_step(x1 - x0);
            let mut v = (x0 / step).ceil() * step;
            let mut t = Vec::new();
            while v <= x1 + step / 1000.0 {
                t.push((v, fmt_num(v)));
                v += step;
            }
            t
        }
        XAxis::Percentile => (0..=x1.ceil() as i32)
            .map(|d| {
                let label = match d {
                    0 => "p0".to_owned(),
                    1 => "p90".to_owned(),
                    d => format!(
                        "p99{}",
                        if d > 2 {
                            format!(".{}", "9".repeat(d as usize - 2))
                        } else {
                            String::new()
                        }
                    ),
                };
                (f64::from(d), label)
            })
            .filter(|(v, _)| *v >= x0 && *v <= x1 + 1e-9)
            .collect(),
    };
    for (v, label) in ticks {
        let px = sx(v);
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#eee"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            TOP + ph,
            TOP + ph + 18.0,
            esc(&label)
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>
<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>
<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"##,
        LEFT + pw / 2.0,
        H - 10.0,
        esc(x_label),
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        esc(y_label)
    );
    for (i, se) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = se
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{}"/>"#,
            path.join(" ")
        );
        let ly = TOP + 16.0 + 16.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{color}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            LEFT + 10.0,
            ly - 4.0,
            LEFT + 30.0,
            ly - 4.0,
            LEFT + 36.0,
            ly,
            esc(&se.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The percentile curve of a histogram in µs, as (x = -log10(1-q), y = ms) points.
pub fn percentile_series(name: &str, h: &Histogram<u64>) -> Series {
    let mut points = Vec::new();
    if !h.is_empty() {
        // Up to p99.999 or as far as the sample count supports.
        let max_nines = ((h.len() as f64).log10()).clamp(1.0, 5.0);
        let steps = 200;
        for i in 0..=steps {
            let x = max_nines * f64::from(i) / f64::from(steps);
            let q = 1.0 - 10f64.powf(-x);
            points.push((x, h.value_at_quantile(q) as f64 / 1000.0));
        }
        points.push((max_nines, h.max() as f64 / 1000.0));
    }
    Series {
        name: name.to_owned(),
        points,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_well_formed_svg() {
        let mut h = crate::stats::new_hist();
        for v in 1..10_000u64 {
            h.record(v).unwrap();
        }
        let s = chart(
            "t <1>",
            "x",
            "ms",
            XAxis::Percentile,
            &[percentile_series("a", &h)],
        );
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("p99.9"));
        assert!(s.contains("t &lt;1&gt;"));
        let empty = chart("e", "x", "y", XAxis::Linear, &[]);
        assert!(empty.contains("</svg>"));
    }
}
