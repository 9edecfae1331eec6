-- Every committed change is announced on the `resource_events` channel, so that every
-- instance sees it (LISTEN), in commit order. The payload names the row and its version
-- (the deleted row's version for a delete) and, when it fits in a notification (8000
-- bytes), carries the row itself, so that listeners need not read it back.
CREATE OR REPLACE FUNCTION notify_resource_event() RETURNS trigger AS $$
DECLARE
    r resources;
    payload text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        r := OLD;
    ELSE
        r := NEW;
        payload := json_build_object(
            'op', left(TG_OP, 1), 'type', r.type, 'mesh', r.mesh, 'name', r.name, 'version', r.version,
            'row', json_build_object(
                'spec', r.spec, 'labels', r.labels,
                'creation_time', r.creation_time, 'modification_time', r.modification_time,
                'owner_type', r.owner_type, 'owner_mesh', r.owner_mesh, 'owner_name', r.owner_name))::text;
        IF octet_length(payload) < 7900 THEN
            PERFORM pg_notify('resource_events', payload);
            RETURN NULL;
        END IF;
    END IF;
    PERFORM pg_notify('resource_events', json_build_object(
        'op', left(TG_OP, 1), 'type', r.type, 'mesh', r.mesh, 'name', r.name, 'version', r.version)::text);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS resource_events ON resources;
CREATE TRIGGER resource_events AFTER INSERT OR UPDATE OR DELETE ON resources
    FOR EACH ROW EXECUTE FUNCTION notify_resource_event();
