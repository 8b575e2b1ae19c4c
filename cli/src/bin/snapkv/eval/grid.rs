//! `snapkv grid`: the standard compression grid drawn from finished
//! `snapkv eval` runs, as KV-compression leaderboards report it: accuracy
//! against the compression ratio (the fraction of the prompt's cells
//! removed), one chart per protocol with a line per method, and a table of
//! the same numbers per task and filler. Reads each run's `eval.json`;
//! nothing is evaluated again. An answer that several runs hold (the same
//! question of the same document, method and budget: a run that adds a
//! method beside the full cache and SnapKV again) counts once, as the first
//! of them scored it.
//!
//! A point is the mean over tasks of each task's mean score (a task's
//! questions, fillers and seeds pooled), so a task with four questions per
//! document weighs as much as one with a single question. Its ratio is the
//! mean of `1 - budget / prompt tokens` over the records behind it (0 for
//! the full cache).

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;

use super::{mean, Record, SavedReport};
use crate::common::{model_stem, write_text};
use crate::plot::{self, LineChart, Series};

/// Arguments of `snapkv grid`.
#[derive(Debug, Clone, Args)]
pub struct GridArgs {
    /// Folders of finished `snapkv eval` runs (each with its eval.json), comma-separated: any mix of protocols,
    /// fillers and budgets.
    #[arg(long, value_delimiter = ',', required = true)]
    runs: Vec<PathBuf>,
    /// Output folder for grid.txt and one chart per protocol (grid-<protocol>.svg/.png).
    #[arg(long, default_value = "results/grid")]
    out: PathBuf,
}

/// One (protocol, method, budget) cell of the grid.
#[derive(Default)]
struct Cell {
    /// Scores per task, then per filler.
    by_task: BTreeMap<&'static str, BTreeMap<String, Vec<f64>>>,
    ratios: Vec<f64>,
}

impl Cell {
    fn add(&mut self, r: &Record) {
        self.by_task
            .entry(r.task)
            .or_default()
            .entry(r.haystack.clone())
            .or_default()
            .push(100.0 * r.score);
        self.ratios.push(match r.budget {
            Some(b) if r.prompt_tokens > 0 => 1.0 - b as f64 / r.prompt_tokens as f64,
            _ => 0.0,
        });
    }

    /// The mean over tasks of each task's mean score.
    fn accuracy(&self) -> f64 {
        mean(
            self.by_task
                .values()
                .map(|fillers| mean(fillers.values().flatten().copied()).unwrap_or(0.0)),
        )
        .unwrap_or(0.0)
    }

    fn task_accuracy(&self, task: &str, filler: Option<&str>) -> Option<f64> {
        let fillers = self.by_task.get(task)?;
        match filler {
            Some(f) => mean(fillers.get(f)?.iter().copied()),
            None => mean(fillers.values().flatten().copied()),
        }
    }

    fn ratio(&self) -> f64 {
        mean(self.ratios.iter().copied()).unwrap_or(0.0)
    }
}

/// Key of a grid cell: protocol, method (in first-seen order), budget
/// (`None` for the full cache, first).
type CellKey = (String, usize, Option<usize>);

/// Runs `snapkv grid`.
///
/// # Errors
/// [`snapkv::Error::InvalidArgument`] for a folder without a readable
/// `eval.json` or runs that hold no records; I/O errors writing the table.
pub fn run(args: &GridArgs) -> snapkv::Result<()> {
    let mut records = Vec::new();
    let mut models = Vec::new();
    for dir in &args.runs {
        let path = dir.join("eval.json");
        let bytes = std::fs::read(&path).map_err(|e| snapkv::Error::InvalidArgument {
            param: "runs",
            reason: format!("{}: {e}", path.display()),
        })?;
        let saved: SavedReport = serde_json::from_slice(&bytes).map_err(|e| snapkv::Error::InvalidArgument {
            param: "runs",
            reason: format!("{} is not an eval report: {e}", path.display()),
        })?;
        let model = model_stem(std::path::Path::new(&saved.info.model));
        if !models.contains(&model) {
            models.push(model);
        }
        records.extend(saved.records);
    }
    if records.is_empty() {
        return Err(snapkv::Error::InvalidArgument {
            param: "runs",
            reason: "the runs hold no records".into(),
        });
    }
    // Look-ahead variants answer after part of the answer is known: not
    // points of this grid.
    records.retain(|r| r.lookahead == 0);
    let (repeated, disagreeing) = drop_repeated_answers(&mut records);
    if repeated > 0 {
        println!(
            "{repeated} records answer a question an earlier run already answered (same protocol, document, \
             question, method and budget): counted once, as the earlier run scored them ({disagreeing} scored \
             differently)"
        );
    }
    let mut methods: Vec<String> = Vec::new();
    let mut cells: BTreeMap<CellKey, Cell> = BTreeMap::new();
    for r in &records {
        let m = match methods.iter().position(|m| *m == r.method) {
            Some(i) => i,
            None => {
                methods.push(r.method.clone());
                methods.len() - 1
            }
        };
        cells.entry((r.protocol.clone(), m, r.budget)).or_default().add(r);
    }
    let protocols: Vec<String> = {
        let mut p: Vec<String> = cells.keys().map(|k| k.0.clone()).collect();
        p.dedup();
        p
    };
    let model = models.join(", ");
    let table = grid_table(&protocols, &methods, &cells);
    print!("{table}");
    std::fs::create_dir_all(&args.out)?;
    write_text(&args.out.join("grid.txt"), &table)?;
    for protocol in &protocols {
        let series: Vec<Series> = methods
            .iter()
            .enumerate()
            .filter_map(|(m, name)| {
                let mut points: Vec<(f64, f64)> = cells
                    .iter()
                    .filter(|((p, mm, _), _)| p == protocol && *mm == m)
                    .map(|(_, c)| (c.ratio(), c.accuracy()))
                    .collect();
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                (!points.is_empty()).then(|| Series {
                    name: name.clone(),
                    points,
                })
            })
            .collect();
        let widest = series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .fold(0.0, f64::max);
        // The full cache, drawn flat across the ratios of the others.
        let series = series
            .into_iter()
            .map(|s| match s.points.as_slice() {
                [(x, y)] if *x == 0.0 => Series {
                    points: vec![(0.0, *y), (widest, *y)],
                    ..s
                },
                _ => s,
            })
            .collect();
        plot::report(plot::line_chart(
            &args.out.join(format!("grid-{protocol}")),
            &LineChart {
                title: format!("{protocol} · accuracy vs compression ratio · {model}"),
                axes: (
                    "compression ratio (fraction of the prompt's cells removed)",
                    "accuracy (%)",
                ),
                series,
                log2_x: false,
                y_max: Some(105.0),
            },
        ));
    }
    Ok(())
}

/// Keeps the first of the records that answer the same question of the same
/// document with the same method and budget (runs that share their full
/// cache or baselines would otherwise weigh twice), in order. Returns how
/// many were dropped and how many of those scored differently from the one
/// kept.
fn drop_repeated_answers(records: &mut Vec<Record>) -> (usize, usize) {
    let key = |r: &Record| {
        format!(
            "{}|{}|{}|{}|{}|{}|{}|{}|{:?}",
            r.protocol, r.task, r.haystack, r.length, r.depth, r.seed, r.question, r.method, r.budget
        )
    };
    let mut first_score: HashMap<String, f64> = HashMap::new();
    let (before, mut disagreeing) = (records.len(), 0);
    records.retain(|r| match first_score.entry(key(r)) {
        Entry::Occupied(kept) => {
            disagreeing += usize::from(*kept.get() != r.score);
            false
        }
        Entry::Vacant(slot) => {
            slot.insert(r.score);
            true
        }
    });
    (before - records.len(), disagreeing)
}

/// The grid as text: per protocol, the mean accuracy of every method at
/// each ratio, then each task's (and each filler's) accuracy.
fn grid_table(protocols: &[String], methods: &[String], cells: &BTreeMap<CellKey, Cell>) -> String {
    let width = methods.iter().map(String::len).max().unwrap_or(0).max(12);
    let mut out = String::new();
    for protocol in protocols {
        let of_protocol: Vec<(&CellKey, &Cell)> = cells.iter().filter(|(k, _)| &k.0 == protocol).collect();
        let tasks: Vec<&'static str> = {
            let mut t: Vec<&'static str> = of_protocol
                .iter()
                .flat_map(|(_, c)| c.by_task.keys().copied())
                .collect();
            t.sort_unstable();
            t.dedup();
            t
        };
        let fillers: Vec<String> = {
            let mut f: Vec<String> = of_protocol
                .iter()
                .flat_map(|(_, c)| c.by_task.values().flat_map(|f| f.keys().cloned()))
                .collect();
            f.sort_unstable();
            f.dedup();
            f
        };
        let _ = writeln!(
            out,
            "{protocol}: accuracy (%), the mean over tasks ({}) of each task's questions pooled over fillers ({}) \
             and seeds; ratio = fraction of the prompt's cells removed",
            tasks.join(", "),
            fillers.join(", ")
        );
        let _ = write!(out, "{:<width$} {:>7} {:>6} {:>8}", "method", "budget", "ratio", "mean");
        for t in &tasks {
            let _ = write!(out, " {t:>10}");
        }
        if fillers.len() > 1 {
            for t in &tasks {
                for f in &fillers {
                    let _ = write!(out, " {:>16}", format!("{t}/{}", short(f)));
                }
            }
        }
        out.push('\n');
        for ((_, m, budget), cell) in &of_protocol {
            let _ = write!(
                out,
                "{:<width$} {:>7} {:>6.3} {:>7.1}%",
                methods[*m],
                budget.map_or("-".to_string(), |b| b.to_string()),
                cell.ratio(),
                cell.accuracy()
            );
            for t in &tasks {
                let _ = write!(out, " {:>10}", percent(cell.task_accuracy(t, None)));
            }
            if fillers.len() > 1 {
                for t in &tasks {
                    for f in &fillers {
                        let _ = write!(out, " {:>16}", percent(cell.task_accuracy(t, Some(f))));
                    }
                }
            }
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

fn percent(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |v| format!("{v:.1}%"))
}

/// A filler's name cut to fit a column.
fn short(name: &str) -> &str {
    name.get(..name.len().min(7)).unwrap_or(name)
}
