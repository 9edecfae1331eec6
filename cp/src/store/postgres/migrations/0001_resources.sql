-- Every resource, one row: Kuma's `resources` table (key name + mesh + type, a version,
-- the spec, times, labels and the owner), with the spec and labels as jsonb so that the
-- store can tell an unchanged write from a change. Versions come from one sequence, so
-- a newer write of a row always has a larger version.
CREATE SEQUENCE IF NOT EXISTS resource_versions AS bigint;

CREATE TABLE IF NOT EXISTS resources (
    name              text   NOT NULL,
    mesh              text   NOT NULL,
    type              text   NOT NULL,
    version           bigint NOT NULL,
    spec              jsonb  NOT NULL,
    labels            jsonb  NOT NULL DEFAULT '{}',
    creation_time     text   NOT NULL,
    modification_time text   NOT NULL,
    owner_name        text,
    owner_mesh        text,
    owner_type        text,
    CONSTRAINT resources_pkey PRIMARY KEY (name, mesh, type),
    -- What a resource owns goes with it (a Zone with what global got from it, a proxy
    -- with its insight), as Kuma's owner_fk.
    CONSTRAINT owner_fk FOREIGN KEY (owner_name, owner_mesh, owner_type)
        REFERENCES resources (name, mesh, type) ON DELETE CASCADE
);

CREATE INDEX IF NOT EXISTS resources_owner_idx ON resources (owner_name, owner_mesh, owner_type);
CREATE INDEX IF NOT EXISTS resources_type_idx ON resources (type);
