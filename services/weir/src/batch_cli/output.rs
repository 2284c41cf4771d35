//! Writing a batch's results in OpenAI's batch output format (the lines come from
//! [`weir_router::openai::batch_output`], which the HTTP edge's output files share): the succeeded
//! items in the output file and every other item in the errors file, each written whole.

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::{Path, PathBuf},
};

use weir_proto::router::StreamBatchResultsResponse;
use weir_router::openai::batch_output;
pub use weir_router::openai::batch_output::Line;

/// The line of one item's result. `created` is the `chat.completion`'s time (Unix seconds).
pub fn line(result: &StreamBatchResultsResponse, created: i64) -> anyhow::Result<Line> {
    Ok(batch_output::line(result, created)?)
}

/// A JSONL file written beside its final path and renamed into place by [`JsonlFile::finish`],
/// so a reader never sees half a file and an interrupted run leaves the previous one intact.
pub struct JsonlFile {
    path: PathBuf,
    temporary: PathBuf,
    writer: BufWriter<File>,
    lines: usize,
}

impl JsonlFile {
    /// Creates `<path>.partial` for writing.
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(".partial");
        let temporary = PathBuf::from(temporary);
        let file = File::create(&temporary)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", temporary.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            temporary,
            writer: BufWriter::new(file),
            lines: 0,
        })
    }

    /// Appends one line (`line` is one JSON object, without a newline).
    pub fn write(&mut self, line: &str) -> anyhow::Result<()> {
        self.writer.write_all(line.as_bytes())?;
        self.writer.write_all(b"\n")?;
        self.lines += 1;
        Ok(())
    }

    /// Writes buffered lines to the file (they stay in the `.partial` file until `finish`).
    pub fn flush(&mut self) -> anyhow::Result<()> {
        Ok(self.writer.flush()?)
    }

    /// Flushes, syncs and renames the file to its final path; returns the lines written.
    pub fn finish(mut self) -> anyhow::Result<usize> {
        self.writer.flush()?;
        self.writer.get_ref().sync_all()?;
        std::fs::rename(&self.temporary, &self.path)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", self.path.display()))?;
        Ok(self.lines)
    }

    /// The final path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// `<dir>/<stem>.output.jsonl` and `<dir>/<stem>.errors.jsonl` for an input file `<dir>/<stem>.jsonl`.
pub fn default_paths(input: &Path) -> (PathBuf, PathBuf) {
    let stem = input
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "batch".to_string());
    (
        input.with_file_name(format!("{stem}.output.jsonl")),
        input.with_file_name(format!("{stem}.errors.jsonl")),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn default_paths_sit_beside_the_input() {
        let (output, errors) = default_paths(Path::new("/data/run.jsonl"));
        assert_eq!(output, Path::new("/data/run.output.jsonl"));
        assert_eq!(errors, Path::new("/data/run.errors.jsonl"));
        let (output, _) = default_paths(Path::new("questions"));
        assert_eq!(output, Path::new("questions.output.jsonl"));
    }

    #[test]
    fn a_file_appears_only_when_finished() {
        let dir = std::env::temp_dir().join(format!("weir-batch-out-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.output.jsonl");
        let mut file = JsonlFile::create(&path).unwrap();
        file.write(r#"{"a":1}"#).unwrap();
        file.write(r#"{"b":2}"#).unwrap();
        file.flush().unwrap();
        assert!(!path.exists());
        assert_eq!(file.finish().unwrap(), 2);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"a\":1}\n{\"b\":2}\n"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
