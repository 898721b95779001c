//! Two feature files from one computation: CLAM's layout (`--format clam`) writes each
//! sample as `h5_files/SAMPLE.h5` (its coordinates, for heatmaps) and `pt_files/SAMPLE.pt`
//! (what its training loads). [`Pair`] hands every group of rows to both writers and stages
//! both files together, so they replace the previous pair only with each other and with the
//! side files (a failure in either leaves both as they were).

use anyhow::Result;

use super::{Committed, FeatureRow, FeatureWriter, NoEncoding, RowEncoder, Staged};

/// Two writers of formats that encode in their writer (HDF5, `.pt`): the first is the
/// sample's feature file (its hash goes into the provenance), the second its companion.
pub struct Pair {
    first: Box<dyn FeatureWriter>,
    second: Box<dyn FeatureWriter>,
}

impl Pair {
    pub fn new(first: Box<dyn FeatureWriter>, second: Box<dyn FeatureWriter>) -> Pair {
        Pair { first, second }
    }
}

impl FeatureWriter for Pair {
    fn encoder(&self) -> std::sync::Arc<dyn RowEncoder> {
        std::sync::Arc::new(NoEncoding)
    }

    fn append(&mut self, _encoded: &[u8], rows: &[FeatureRow<'_>]) -> Result<()> {
        self.first.append(&[], rows)?;
        self.second.append(&[], rows)
    }

    fn finish(self: Box<Self>) -> Result<(Staged, Committed)> {
        let (first, mut committed) = self.first.finish()?;
        let (second, companion) = self.second.finish()?;
        committed.companion = Some(Box::new(companion));
        Ok((first.and(second), committed))
    }
}
