-- The append-only guard on evidence, as a trigger condition rather than a PL/pgSQL test per row.
-- The sequencer updates every record once (to give it its log index), and calling a PL/pgSQL
-- function for each of those rows only to find the update allowed was a measurable part of its
-- cost. A WHEN clause is evaluated by the executor itself: the allowed update (log_index from
-- null to a value, every other column as written) calls nothing; any other update calls the
-- function, which refuses it, as before.
drop trigger evidence_no_update on evidence;
drop function evidence_sequenced_once();

create function evidence_update_refused() returns trigger language plpgsql as $$
begin
    raise exception 'evidence is append-only: UPDATE refused (only the sequencer gives a record its log index, once)'
        using errcode = 'insufficient_privilege';
end $$;

create trigger evidence_no_update before update on evidence
    for each row
    when (not (old.log_index is null and new.log_index is not null
               and (new.evidence_id, new.item_id, new.recipient_id, new.event, new.at, new.channel, new.canonical,
                    new.sha256, new.leaf_hash, new.created_at, new.seq)
                   is not distinct from
                   (old.evidence_id, old.item_id, old.recipient_id, old.event, old.at, old.channel, old.canonical,
                    old.sha256, old.leaf_hash, old.created_at, old.seq)))
    execute function evidence_update_refused();
