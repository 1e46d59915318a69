//! A small log–log SVG plot writer: axes, ticks, lines, markers, bands and
//! a legend, as plain SVG text. Hand-rolled because the plotting crates
//! either need system font libraries to lay out text or pull in much more
//! than the few lines here; SVG viewers lay out `<text>` themselves. The
//! output is a pure function of the input (fixed decimal formatting), so
//! plots are as reproducible as the CSV files.

use std::fmt::Write;

/// How a series is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// Solid line with a marker at each point (measurements).
    Measured,
    /// Dashed line, no markers (a fitted power law).
    Fitted,
    /// Dotted line, no markers (a theory reference).
    Theory,
}

/// One series.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Any SVG colour.
    pub color: String,
    /// Points `(x, y)`, both positive (others are skipped).
    pub points: Vec<(f64, f64)>,
    /// Optional band `(x, low, high)` drawn under the line (e.g. p10–p90).
    pub band: Vec<(f64, f64, f64)>,
    /// How it is drawn.
    pub style: Style,
}

/// A log–log plot.
#[derive(Clone, Debug)]
pub struct Plot {
    /// Title.
    pub title: String,
    /// x-axis label.
    pub x_label: String,
    /// y-axis label.
    pub y_label: String,
    /// Label x ticks as powers of two (`2^k`) instead of decades.
    pub x_pow2: bool,
    /// The series, drawn in order.
    pub series: Vec<Series>,
}

const W: f64 = 760.0;
const H: f64 = 500.0;
const LEFT: f64 = 78.0;
const RIGHT: f64 = 250.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 58.0;

/// A colour palette that stays distinguishable in print.
pub const PALETTE: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn fmt_tick(v: f64) -> String {
    if (1e-3..1e6).contains(&v) {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("1e{}", v.log10().round())
    }
}

/// The plot as an SVG document.
pub fn render(p: &Plot) -> String {
    let pos = |(x, y): (f64, f64)| x > 0.0 && y > 0.0 && x.is_finite() && y.is_finite();
    let mut xs: Vec<f64> = Vec::new();
    let mut ys: Vec<f64> = Vec::new();
    for s in &p.series {
        for &pt in s.points.iter().filter(|&&pt| pos(pt)) {
            xs.push(pt.0);
            ys.push(pt.1);
        }
        for &(x, lo, hi) in &s.band {
            for y in [lo, hi] {
                if pos((x, y)) {
                    ys.push(y);
                }
            }
        }
    }
    let (x0, x1) = bounds(&xs, p.x_pow2);
    let (y0, y1) = bounds(&ys, false);
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let sx = |x: f64| LEFT + (x.ln() - x0.ln()) / (x1.ln() - x0.ln()) * pw;
    let sy = |y: f64| TOP + ph - (y.ln() - y0.ln()) / (y1.ln() - y0.ln()) * ph;
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        esc(&p.title)
    );
    // Grid and ticks.
    let mut xt = Vec::new();
    if p.x_pow2 {
        let (a, b) = (x0.log2().round() as i32, x1.log2().round() as i32);
        let step = ((b - a) / 10).max(1);
        let mut e = a;
        while e <= b {
            xt.push((2f64.powi(e), format!("2^{e}")));
            e += step;
        }
    } else {
        for v in decade_ticks(x0, x1) {
            xt.push((v, fmt_tick(v)));
        }
    }
    for (v, label) in &xt {
        let x = sx(*v);
        let _ = writeln!(o, r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#e4e4e4"/>"##, TOP + ph);
        let _ =
            writeln!(o, r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#, TOP + ph + 16.0, esc(label));
    }
    for v in decade_ticks(y0, y1) {
        let y = sy(v);
        let major = (v.log10() - v.log10().round()).abs() < 1e-9;
        let _ = writeln!(
            o,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{}"/>"##,
            LEFT + pw,
            if major { "#d0d0d0" } else { "#f0f0f0" }
        );
        if major || (y1 / y0) < 30.0 {
            let _ = writeln!(
                o,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                LEFT - 6.0,
                y + 4.0,
                fmt_tick(v)
            );
        }
    }
    let _ = writeln!(o, r#"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        H - 14.0,
        esc(&p.x_label)
    );
    let _ = writeln!(
        o,
        r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">{}</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        esc(&p.y_label)
    );
    // Series, clipped to the plot area.
    let _ = writeln!(o, r#"<clipPath id="area"><rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}"/></clipPath>"#);
    let _ = writeln!(o, r#"<g clip-path="url(#area)">"#);
    for s in &p.series {
        let band: Vec<&(f64, f64, f64)> =
            s.band.iter().filter(|(x, lo, hi)| pos((*x, *lo)) && pos((*x, *hi))).collect();
        if band.len() >= 2 {
            let mut d = String::new();
            for (x, _, hi) in &band {
                let _ = write!(d, "{:.1},{:.1} ", sx(*x), sy(*hi));
            }
            for (x, lo, _) in band.iter().rev() {
                let _ = write!(d, "{:.1},{:.1} ", sx(*x), sy(*lo));
            }
            let _ = writeln!(
                o,
                r#"<polygon points="{}" fill="{}" fill-opacity="0.12" stroke="none"/>"#,
                d.trim_end(),
                s.color
            );
        }
        let pts: Vec<(f64, f64)> = s.points.iter().copied().filter(|&pt| pos(pt)).collect();
        let mut d = String::new();
        for &(x, y) in &pts {
            let _ = write!(d, "{:.1},{:.1} ", sx(x), sy(y));
        }
        let dash = match s.style {
            Style::Measured => "",
            Style::Fitted => r#" stroke-dasharray="7 4""#,
            Style::Theory => r#" stroke-dasharray="2 3""#,
        };
        let width = if s.style == Style::Measured { 2.0 } else { 1.5 };
        let _ = writeln!(
            o,
            r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="{width}"{dash}/>"#,
            d.trim_end(),
            s.color
        );
        if s.style == Style::Measured {
            for &(x, y) in &pts {
                let _ = writeln!(o, r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{}"/>"#, sx(x), sy(y), s.color);
            }
        }
    }
    let _ = writeln!(o, "</g>");
    // Legend.
    let lx = LEFT + pw + 14.0;
    for (i, s) in p.series.iter().enumerate() {
        let y = TOP + 8.0 + 18.0 * i as f64;
        let dash = match s.style {
            Style::Measured => "",
            Style::Fitted => r#" stroke-dasharray="7 4""#,
            Style::Theory => r#" stroke-dasharray="2 3""#,
        };
        let _ = writeln!(
            o,
            r#"<line x1="{lx:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{}" stroke-width="2"{dash}/>"#,
            lx + 24.0,
            s.color
        );
        let _ = writeln!(o, r#"<text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#, lx + 30.0, y + 4.0, esc(&s.name));
    }
    o.push_str("</svg>\n");
    o
}

/// Axis range: the data's, widened a little (to whole powers of two for a
/// power-of-two axis), and never empty.
fn bounds(v: &[f64], pow2: bool) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !(lo.is_finite() && hi.is_finite()) {
        return (1.0, 10.0);
    }
    if pow2 {
        let (a, b) = (lo.log2().floor(), hi.log2().ceil());
        return (2f64.powf(a), 2f64.powf(if b > a { b } else { a + 1.0 }));
    }
    let (a, b) = (lo / 1.3, hi * 1.3);
    if b / a < 2.0 { (a / 1.5, b * 1.5) } else { (a, b) }
}

/// 1, 2, …, 9 times each power of ten inside `[lo, hi]`.
fn decade_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut e = lo.log10().floor() as i32;
    while 10f64.powi(e) <= hi {
        for m in 1..10 {
            let v = f64::from(m) * 10f64.powi(e);
            if v >= lo && v <= hi {
                out.push(v);
            }
        }
        e += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dp_svg_is_well_formed_and_deterministic() {
        let plot = Plot {
            title: "error <vs> T".into(),
            x_label: "T".into(),
            y_label: "error".into(),
            x_pow2: true,
            series: vec![
                Series {
                    name: "measured".into(),
                    color: PALETTE[0].into(),
                    points: vec![(64.0, 3.0), (128.0, 4.0), (256.0, 0.0), (512.0, 6.0)],
                    band: vec![(64.0, 2.0, 4.0), (512.0, 5.0, 8.0)],
                    style: Style::Measured,
                },
                Series {
                    name: "fit".into(),
                    color: PALETTE[1].into(),
                    points: vec![(64.0, 3.0), (512.0, 6.0)],
                    band: vec![],
                    style: Style::Fitted,
                },
            ],
        };
        let a = render(&plot);
        assert_eq!(a, render(&plot));
        assert!(a.starts_with("<svg") && a.ends_with("</svg>\n"));
        assert!(a.contains("error &lt;vs&gt; T"));
        assert!(a.contains("2^6") && a.contains("2^9"));
        // The zero point is skipped: three markers, not four.
        assert_eq!(a.matches("<circle").count(), 3);
        assert_eq!(a.matches("<svg").count(), a.matches("</svg>").count());
    }
}
