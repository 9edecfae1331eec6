//! One descriptor per resource type: its names, scope, REST path, document shape, wire
//! message and how KDS moves it between global and zones (Kuma's `ResourceTypeDescriptor`,
//! `kumahq/kuma:pkg/core/resources/model/resource.go`). Everything that differs between
//! types is a field here, so the rest of `cp` never matches on the type to learn a fact.

/// Whether a resource belongs to a mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Global,
    Mesh,
}

/// How the spec sits in a REST document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Legacy Universal form: spec fields inline beside `type`/`name`/`mesh`.
    Flat,
    /// New-style (`Mesh*` policies): the spec under a `spec` key.
    Nested,
}

/// KDS flags (Kuma's `KDSFlagType`). Zero means the type never travels over KDS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KdsFlags(u8);

impl KdsFlags {
    pub const NONE: KdsFlags = KdsFlags(0);
    pub const CONSUMED_BY_ZONE: KdsFlags = KdsFlags(1);
    pub const CONSUMED_BY_GLOBAL: KdsFlags = KdsFlags(1 << 2);
    pub const PROVIDED_BY_ZONE: KdsFlags = KdsFlags(1 << 3);
    pub const PROVIDED_BY_GLOBAL: KdsFlags = KdsFlags(1 << 4);
    /// Global re-sends zone-originated copies to every other zone.
    pub const SYNCED_ACROSS_ZONES: KdsFlags = KdsFlags(1 << 5);
    pub const ZONE_TO_GLOBAL: KdsFlags = KdsFlags(Self::CONSUMED_BY_GLOBAL.0 | Self::PROVIDED_BY_ZONE.0);
    pub const GLOBAL_TO_ZONES: KdsFlags = KdsFlags(Self::PROVIDED_BY_GLOBAL.0 | Self::CONSUMED_BY_ZONE.0);

    pub const fn or(self, other: KdsFlags) -> KdsFlags {
        KdsFlags(self.0 | other.0)
    }

    pub const fn has(self, other: KdsFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Global sends this type to zones (its own resources, or other zones' copies).
    pub const fn sent_by_global(self) -> bool {
        self.has(Self::GLOBAL_TO_ZONES) || self.has(Self::SYNCED_ACROSS_ZONES)
    }

    /// Zones send this type to global.
    pub const fn sent_by_zone(self) -> bool {
        self.has(Self::ZONE_TO_GLOBAL)
    }
}

/// Everything `cp` knows about a resource type.
#[derive(Debug)]
pub struct Descriptor {
    pub rtype: ResourceType,
    /// Kuma's type name, as in `type:` and on KDS (`Mesh`, `ZoneIngress`, ...).
    pub name: &'static str,
    /// REST path segment (`/meshes`, `/meshes/{m}/dataplanes`, `/zoneingresses`, ...).
    pub plural: &'static str,
    /// Extra REST path segments that list the same type (Kuma's aliases).
    pub aliases: &'static [&'static str],
    pub scope: Scope,
    pub shape: Shape,
    pub kds: KdsFlags,
    /// Keeps its name across KDS (no hash suffix): Mesh, Secret, GlobalSecret, Config.
    pub skip_kds_hash: bool,
    /// Written by the control plane only; the REST API refuses writes.
    pub read_only: bool,
    /// Protobuf message of the spec on KDS; `None` = the spec travels as JSON (Go structs).
    pub proto: Option<&'static str>,
    /// The insight type that describes this one (Dataplane -> DataplaneInsight).
    pub insight: Option<ResourceType>,
    /// A policy (legacy or new-style): configuration that flows global -> zones.
    pub policy: bool,
}

impl Descriptor {
    /// Kuma's `IsReadOnly`: on global only global-provided types are writable, on a
    /// federated zone only zone-provided ones, everywhere else all but read-only ones.
    pub fn writable(&self, global: bool, federated_zone: bool) -> bool {
        !self.read_only
            && (!global || self.kds.has(KdsFlags::PROVIDED_BY_GLOBAL))
            && (!federated_zone || self.kds.has(KdsFlags::PROVIDED_BY_ZONE))
    }
}

macro_rules! resource_types {
    ($($variant:ident),+ $(,)?) => {
        /// The resource types this control plane stores.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum ResourceType { $($variant),+ }

        impl ResourceType {
            pub const ALL: &'static [ResourceType] = &[$(ResourceType::$variant),+];
        }
    };
}

resource_types!(
    Mesh,
    Dataplane,
    DataplaneInsight,
    ZoneIngress,
    ZoneIngressInsight,
    ZoneEgress,
    ZoneEgressInsight,
    Zone,
    ZoneInsight,
    Secret,
    GlobalSecret,
    Config,
    ExternalService,
    TrafficPermission,
    ServiceInsight,
    MeshTrafficPermission,
    MeshTimeout,
    MeshRetry,
    MeshCircuitBreaker,
    MeshHealthCheck,
    MeshLoadBalancingStrategy,
    MeshAccessLog,
    MeshHTTPRoute,
    MeshTCPRoute,
    MeshFaultInjection,
    MeshRateLimit,
    MeshTrace,
    MeshMetric,
    MeshProxyPatch,
    MeshTLS,
);

const fn flat(rtype: ResourceType, name: &'static str, plural: &'static str, scope: Scope) -> Descriptor {
    Descriptor {
        rtype,
        name,
        plural,
        aliases: &[],
        scope,
        shape: Shape::Flat,
        kds: KdsFlags::NONE,
        skip_kds_hash: false,
        read_only: false,
        proto: None,
        insight: None,
        policy: false,
    }
}

/// A new-style policy: nested spec sent as JSON, from global to zones and from the zone
/// that created it to global (Kuma's flags; cross-zone re-sending of zone policies, which
/// Kuma limits to `producer` policies, is not done here).
const fn mesh_policy(rtype: ResourceType, name: &'static str, plural: &'static str) -> Descriptor {
    Descriptor {
        shape: Shape::Nested,
        kds: KdsFlags::GLOBAL_TO_ZONES.or(KdsFlags::ZONE_TO_GLOBAL),
        policy: true,
        ..flat(rtype, name, plural, Scope::Mesh)
    }
}

use ResourceType as T;
use Scope::{Global, Mesh};

static DESCRIPTORS: &[Descriptor] = &[
    Descriptor {
        kds: KdsFlags::GLOBAL_TO_ZONES,
        skip_kds_hash: true,
        proto: Some("kuma.mesh.v1alpha1.Mesh"),
        ..flat(T::Mesh, "Mesh", "meshes", Global)
    },
    Descriptor {
        kds: KdsFlags::ZONE_TO_GLOBAL,
        proto: Some("kuma.mesh.v1alpha1.Dataplane"),
        insight: Some(T::DataplaneInsight),
        ..flat(T::Dataplane, "Dataplane", "dataplanes", Mesh)
    },
    Descriptor {
        kds: KdsFlags::ZONE_TO_GLOBAL,
        read_only: true,
        proto: Some("kuma.mesh.v1alpha1.DataplaneInsight"),
        ..flat(T::DataplaneInsight, "DataplaneInsight", "dataplane-insights", Mesh)
    },
    Descriptor {
        aliases: &["zone-ingresses"],
        kds: KdsFlags::ZONE_TO_GLOBAL.or(KdsFlags::SYNCED_ACROSS_ZONES),
        proto: Some("kuma.mesh.v1alpha1.ZoneIngress"),
        insight: Some(T::ZoneIngressInsight),
        ..flat(T::ZoneIngress, "ZoneIngress", "zoneingresses", Global)
    },
    Descriptor {
        kds: KdsFlags::ZONE_TO_GLOBAL,
        read_only: true,
        proto: Some("kuma.mesh.v1alpha1.ZoneIngressInsight"),
        ..flat(T::ZoneIngressInsight, "ZoneIngressInsight", "zone-ingress-insights", Global)
    },
    Descriptor {
        aliases: &["zone-egresses"],
        kds: KdsFlags::ZONE_TO_GLOBAL,
        proto: Some("kuma.mesh.v1alpha1.ZoneEgress"),
        insight: Some(T::ZoneEgressInsight),
        ..flat(T::ZoneEgress, "ZoneEgress", "zoneegresses", Global)
    },
    Descriptor {
        kds: KdsFlags::ZONE_TO_GLOBAL,
        read_only: true,
        proto: Some("kuma.mesh.v1alpha1.ZoneEgressInsight"),
        ..flat(T::ZoneEgressInsight, "ZoneEgressInsight", "zoneegressinsights", Global)
    },
    // Zone and ZoneInsight are managed by each control plane on its own, never synced.
    Descriptor {
        kds: KdsFlags::PROVIDED_BY_GLOBAL.or(KdsFlags::PROVIDED_BY_ZONE),
        proto: Some("kuma.system.v1alpha1.Zone"),
        insight: Some(T::ZoneInsight),
        ..flat(T::Zone, "Zone", "zones", Global)
    },
    Descriptor {
        kds: KdsFlags::PROVIDED_BY_GLOBAL.or(KdsFlags::PROVIDED_BY_ZONE),
        read_only: true,
        proto: Some("kuma.system.v1alpha1.ZoneInsight"),
        ..flat(T::ZoneInsight, "ZoneInsight", "zone-insights", Global)
    },
    Descriptor {
        kds: KdsFlags::GLOBAL_TO_ZONES.or(KdsFlags::PROVIDED_BY_ZONE),
        skip_kds_hash: true,
        proto: Some("kuma.system.v1alpha1.Secret"),
        ..flat(T::Secret, "Secret", "secrets", Mesh)
    },
    Descriptor {
        kds: KdsFlags::GLOBAL_TO_ZONES,
        skip_kds_hash: true,
        proto: Some("kuma.system.v1alpha1.Secret"),
        ..flat(T::GlobalSecret, "GlobalSecret", "global-secrets", Global)
    },
    // Kuma syncs only `kuma-cluster-id` of the Configs; ours (the VIP views) are zone-local.
    Descriptor { proto: Some("kuma.system.v1alpha1.Config"), ..flat(T::Config, "Config", "configs", Global) },
    Descriptor {
        kds: KdsFlags::GLOBAL_TO_ZONES,
        proto: Some("kuma.mesh.v1alpha1.ExternalService"),
        ..flat(T::ExternalService, "ExternalService", "external-services", Mesh)
    },
    Descriptor {
        kds: KdsFlags::GLOBAL_TO_ZONES,
        proto: Some("kuma.mesh.v1alpha1.TrafficPermission"),
        policy: true,
        ..flat(T::TrafficPermission, "TrafficPermission", "traffic-permissions", Mesh)
    },
    Descriptor {
        kds: KdsFlags::GLOBAL_TO_ZONES,
        read_only: true,
        proto: Some("kuma.mesh.v1alpha1.ServiceInsight"),
        ..flat(T::ServiceInsight, "ServiceInsight", "service-insights", Mesh)
    },
    mesh_policy(T::MeshTrafficPermission, "MeshTrafficPermission", "meshtrafficpermissions"),
    mesh_policy(T::MeshTimeout, "MeshTimeout", "meshtimeouts"),
    mesh_policy(T::MeshRetry, "MeshRetry", "meshretries"),
    mesh_policy(T::MeshCircuitBreaker, "MeshCircuitBreaker", "meshcircuitbreakers"),
    mesh_policy(T::MeshHealthCheck, "MeshHealthCheck", "meshhealthchecks"),
    mesh_policy(T::MeshLoadBalancingStrategy, "MeshLoadBalancingStrategy", "meshloadbalancingstrategies"),
    mesh_policy(T::MeshAccessLog, "MeshAccessLog", "meshaccesslogs"),
    mesh_policy(T::MeshHTTPRoute, "MeshHTTPRoute", "meshhttproutes"),
    mesh_policy(T::MeshTCPRoute, "MeshTCPRoute", "meshtcproutes"),
    mesh_policy(T::MeshFaultInjection, "MeshFaultInjection", "meshfaultinjections"),
    mesh_policy(T::MeshRateLimit, "MeshRateLimit", "meshratelimits"),
    mesh_policy(T::MeshTrace, "MeshTrace", "meshtraces"),
    mesh_policy(T::MeshMetric, "MeshMetric", "meshmetrics"),
    mesh_policy(T::MeshProxyPatch, "MeshProxyPatch", "meshproxypatches"),
    mesh_policy(T::MeshTLS, "MeshTLS", "meshtlses"),
];

impl ResourceType {
    pub fn descriptor(self) -> &'static Descriptor {
        // The table lists the types in declaration order (checked by a test).
        &DESCRIPTORS[self as usize]
    }

    pub fn name(self) -> &'static str {
        self.descriptor().name
    }

    pub fn from_name(s: &str) -> Option<Self> {
        DESCRIPTORS.iter().find(|d| d.name == s).map(|d| d.rtype)
    }

    /// The type whose REST path segment (or alias) is `segment`.
    pub fn from_plural(segment: &str) -> Option<Self> {
        DESCRIPTORS.iter().find(|d| d.plural == segment || d.aliases.contains(&segment)).map(|d| d.rtype)
    }

    pub fn plural(self) -> &'static str {
        self.descriptor().plural
    }

    pub fn is_mesh_scoped(self) -> bool {
        self.descriptor().scope == Scope::Mesh
    }

    pub fn kds(self) -> KdsFlags {
        self.descriptor().kds
    }

    /// The type an insight describes (DataplaneInsight -> Dataplane).
    pub fn insight_subject(self) -> Option<ResourceType> {
        DESCRIPTORS.iter().find(|d| d.insight == Some(self)).map(|d| d.rtype)
    }
}

impl std::fmt::Display for ResourceType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_in_declaration_order_and_names_are_unique() {
        assert_eq!(DESCRIPTORS.len(), ResourceType::ALL.len());
        for (i, t) in ResourceType::ALL.iter().enumerate() {
            assert_eq!(DESCRIPTORS[i].rtype, *t, "descriptor #{i}");
            assert_eq!(ResourceType::from_name(t.name()), Some(*t));
            assert_eq!(ResourceType::from_plural(t.plural()), Some(*t));
        }
    }

    #[test]
    fn writability_follows_kuma() {
        let w = |t: ResourceType, global, federated| t.descriptor().writable(global, federated);
        // Standalone zone: everything but insights.
        assert!(w(T::Mesh, false, false) && w(T::Dataplane, false, false) && !w(T::ZoneInsight, false, false));
        // Global: not the zone-provided types.
        assert!(w(T::Mesh, true, false) && w(T::Zone, true, false));
        assert!(!w(T::Dataplane, true, false) && !w(T::ZoneIngress, true, false));
        // Federated zone: only zone-provided ones.
        assert!(!w(T::Mesh, false, true) && !w(T::TrafficPermission, false, true));
        assert!(w(T::Dataplane, false, true) && w(T::Secret, false, true) && w(T::Zone, false, true));
    }

    #[test]
    fn flags() {
        assert!(T::ZoneIngress.kds().sent_by_global() && T::ZoneIngress.kds().sent_by_zone());
        assert!(T::Mesh.kds().sent_by_global() && !T::Mesh.kds().sent_by_zone());
        assert!(!T::ZoneEgress.kds().sent_by_global() && T::ZoneEgress.kds().sent_by_zone());
        assert!(!T::Zone.kds().sent_by_global() && !T::Zone.kds().sent_by_zone());
        assert_eq!(T::DataplaneInsight.insight_subject(), Some(T::Dataplane));
    }
}
