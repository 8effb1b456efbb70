//! Volumes: finish what a crash interrupted (`creating`, a pending resize or replica count,
//! `deleting`).

use super::Reconciler;
use crate::events::Kind;
use crate::registry::Registry;
use crate::registry::records::{PendingOp, VolumePhase};

impl Reconciler {
    pub(super) async fn volumes(&mut self, reg: &Registry) {
        let ids: Vec<_> = reg
            .state
            .read()
            .volumes
            .values()
            .filter(|v| v.phase != VolumePhase::Ready || v.pending.is_some())
            .map(|v| v.id)
            .collect();
        for id in ids {
            let subject = format!("volume {id}");
            let result = self.volume(reg, id).await;
            match result {
                Ok(()) => self.succeeded(&subject),
                Err(e) => self.failed(reg, Kind::Volume, &id.to_string(), subject, e).await,
            }
        }
    }

    async fn volume(
        &mut self,
        reg: &Registry,
        id: trireme_types::VolumeId,
    ) -> Result<(), crate::ControlError> {
        let _guard = reg.lock_volume(id).await;
        let Some(mut record) = reg.volume_record(&id) else { return Ok(()) };
        match record.phase {
            VolumePhase::Deleting => return reg.finish_volume_delete(&record).await,
            VolumePhase::Creating => {
                // A create in flight holds the create lock; only finish abandoned ones.
                let Ok(_create) = reg.try_lock_create() else { return Ok(()) };
                reg.create_replicas(&record).await?;
                record = reg
                    .update_volume(id, |r| {
                        r.phase = VolumePhase::Ready;
                        Ok(())
                    })
                    .await?
                    .0;
                reg.events()
                    .record(
                        Kind::Volume,
                        id,
                        "created",
                        format!("volume {} created (finished after an interruption)", record.name),
                    )
                    .await;
            }
            VolumePhase::Ready => {}
        }
        match record.pending {
            Some(PendingOp::Resize { .. }) => reg.apply_resize(&record).await?,
            Some(PendingOp::Replicas) => reg.finish_set_replicas(id, false).await?,
            None => {}
        }
        Ok(())
    }
}
