package localkafka;

import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Collections;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CompletionStage;
import org.apache.kafka.common.Endpoint;
import org.apache.kafka.common.acl.AclBinding;
import org.apache.kafka.common.acl.AclBindingFilter;
import org.apache.kafka.common.acl.AclOperation;
import org.apache.kafka.common.errors.InvalidRequestException;
import org.apache.kafka.common.resource.ResourcePattern;
import org.apache.kafka.common.resource.ResourceType;
import org.apache.kafka.common.security.auth.KafkaPrincipal;
import org.apache.kafka.server.authorizer.AclCreateResult;
import org.apache.kafka.server.authorizer.AclDeleteResult;
import org.apache.kafka.server.authorizer.Action;
import org.apache.kafka.server.authorizer.AuthorizableRequestContext;
import org.apache.kafka.server.authorizer.AuthorizationResult;
import org.apache.kafka.server.authorizer.Authorizer;
import org.apache.kafka.server.authorizer.AuthorizerServerInfo;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Authorizes requests the way MSK's IAM access control does, for the test keys that have a
 * policy (see {@link IamPolicies} for the policy lines in {@code iam-keys.properties}), so the
 * sidecar's handling of missing permissions is tested against a real broker's denials.
 *
 * <p>Each Kafka operation on a resource stands for one MSK action, as in AWS's "Semantics of IAM
 * authorization policy actions and resources": READ topic is {@code ReadData}, READ group is
 * {@code AlterGroup} (joining), WRITE transactional-id is {@code AlterTransactionalId}, and so
 * on ({@link #action}). As on MSK there is no implication between actions: ReadData does not
 * grant DescribeTopic (Kafka's own authorizer lets READ imply DESCRIBE; MSK makes policies list
 * both). Operations without an MSK action (CLUSTER_ACTION, delegation tokens, users,
 * TWO_PHASE_COMMIT) are denied to restricted keys. {@code kafka-cluster:Connect} is not checked
 * here: authentication is the validator's, which accepts any key with a valid signature.
 *
 * <p>Every other principal (PLAINTEXT and SSL clients, the SCRAM user, mTLS certificates, the
 * brokers and controllers themselves, IAM keys without a policy) is allowed everything, so the
 * test bed behaves as it did before for everything but the restricted keys. ACLs cannot be
 * created or deleted: the policies are the file's.
 *
 * <p>Broker config: {@code localkafka.iam.keys.file}, the credentials file of the validator.
 */
public final class MskIamAuthorizer implements Authorizer {
    private static final Logger LOG = LoggerFactory.getLogger(MskIamAuthorizer.class);
    static final String KEYS_FILE_CONFIG = "localkafka.iam.keys.file";

    private IamPolicies policies;

    @Override
    public void configure(Map<String, ?> configs) {
        Object file = configs.get(KEYS_FILE_CONFIG);
        if (file == null) {
            throw new IllegalArgumentException("MskIamAuthorizer needs " + KEYS_FILE_CONFIG);
        }
        policies = new IamPolicies(Path.of(file.toString()));
    }

    @Override
    public Map<Endpoint, ? extends CompletionStage<Void>> start(AuthorizerServerInfo serverInfo) {
        // Nothing to load from the cluster: every listener (CONTROLLER included, on a combined
        // node) may serve requests at once.
        Map<Endpoint, CompletableFuture<Void>> ready = new HashMap<>();
        for (Endpoint endpoint : serverInfo.endpoints()) {
            ready.put(endpoint, CompletableFuture.completedFuture(null));
        }
        return ready;
    }

    @Override
    public List<AuthorizationResult> authorize(AuthorizableRequestContext context, List<Action> actions) {
        List<AuthorizationResult> results = new ArrayList<>(actions.size());
        KafkaPrincipal principal = context.principal();
        String key = keyOf(principal);
        for (Action action : actions) {
            if (key == null) {
                results.add(AuthorizationResult.ALLOWED);
                continue;
            }
            ResourcePattern pattern = action.resourcePattern();
            String msk = action(action.operation(), pattern.resourceType());
            IamPolicies.Resource resource = resource(pattern);
            IamPolicies.Decision decision = policies.decide(key, msk, resource);
            if (!decision.allowed && action.logIfDenied()) {
                LOG.info("MSK IAM authorization: {} denied {} on {} ({} {}: {}; client {} at {})",
                        key, msk == null ? "(no MSK action)" : msk, resource, action.operation(),
                        pattern.resourceType(), decision == IamPolicies.Decision.EXPLICIT_DENY
                                ? "explicit deny" : "not allowed",
                        context.clientId(), context.clientAddress());
            }
            results.add(decision.allowed ? AuthorizationResult.ALLOWED : AuthorizationResult.DENIED);
        }
        return results;
    }

    @Override
    public AuthorizationResult authorizeByResourceType(
            AuthorizableRequestContext context, AclOperation op, ResourceType resourceType) {
        String key = keyOf(context.principal());
        if (key == null) {
            return AuthorizationResult.ALLOWED;
        }
        String msk = action(op, resourceType);
        boolean allowed = policies.allowedOnSome(key, msk, typeName(resourceType));
        return allowed ? AuthorizationResult.ALLOWED : AuthorizationResult.DENIED;
    }

    /** The access key id of a restricted IAM key, or null for a principal allowed everything. */
    private String keyOf(KafkaPrincipal principal) {
        if (principal == null || !KafkaPrincipal.USER_TYPE.equals(principal.getPrincipalType())) {
            return null;
        }
        String name = principal.getName();
        return policies.restricted(name) ? name : null;
    }

    /** The MSK action a Kafka operation on a resource type stands for; null if none does. */
    static String action(AclOperation op, ResourceType type) {
        String a = null;
        switch (type) {
            case TOPIC:
                switch (op) {
                    case READ: a = "ReadData"; break;
                    case WRITE: a = "WriteData"; break;
                    case CREATE: a = "CreateTopic"; break;
                    case DELETE: a = "DeleteTopic"; break;
                    case ALTER: a = "AlterTopic"; break;
                    case DESCRIBE: a = "DescribeTopic"; break;
                    case DESCRIBE_CONFIGS: a = "DescribeTopicDynamicConfiguration"; break;
                    case ALTER_CONFIGS: a = "AlterTopicDynamicConfiguration"; break;
                    default: break;
                }
                break;
            case GROUP:
                switch (op) {
                    case READ: a = "AlterGroup"; break;
                    case DESCRIBE: a = "DescribeGroup"; break;
                    case DELETE: a = "DeleteGroup"; break;
                    default: break;
                }
                break;
            case CLUSTER:
                switch (op) {
                    case DESCRIBE: a = "DescribeCluster"; break;
                    case ALTER: a = "AlterCluster"; break;
                    case DESCRIBE_CONFIGS: a = "DescribeClusterDynamicConfiguration"; break;
                    case ALTER_CONFIGS: a = "AlterClusterDynamicConfiguration"; break;
                    case IDEMPOTENT_WRITE: a = "WriteDataIdempotently"; break;
                    // CREATE CLUSTER: "create any topic". MSK's CreateTopic is per topic: this
                    // asks for it on the cluster resource, which only a `cluster` or `*`
                    // statement grants; Kafka then checks CREATE on each topic.
                    case CREATE: a = "CreateTopic"; break;
                    default: break;
                }
                break;
            case TRANSACTIONAL_ID:
                switch (op) {
                    case DESCRIBE: a = "DescribeTransactionalId"; break;
                    case WRITE: a = "AlterTransactionalId"; break;
                    default: break;
                }
                break;
            default:
                break;
        }
        return a == null ? null : IamPolicies.PREFIX + a;
    }

    private static String typeName(ResourceType type) {
        switch (type) {
            case TOPIC: return "topic";
            case GROUP: return "group";
            case CLUSTER: return "cluster";
            case TRANSACTIONAL_ID: return "transactional-id";
            default: return type.name().toLowerCase(java.util.Locale.ROOT);
        }
    }

    private static IamPolicies.Resource resource(ResourcePattern pattern) {
        ResourceType type = pattern.resourceType();
        String name = type == ResourceType.CLUSTER ? "" : pattern.name();
        return new IamPolicies.Resource(typeName(type), name);
    }

    @Override
    public List<? extends CompletionStage<AclCreateResult>> createAcls(
            AuthorizableRequestContext context, List<AclBinding> bindings) {
        List<CompletableFuture<AclCreateResult>> out = new ArrayList<>();
        for (AclBinding ignored : bindings) {
            out.add(CompletableFuture.completedFuture(new AclCreateResult(new InvalidRequestException(
                    "the local MSK IAM authorizer has no ACLs: policies are set in iam-keys.properties"))));
        }
        return out;
    }

    @Override
    public List<? extends CompletionStage<AclDeleteResult>> deleteAcls(
            AuthorizableRequestContext context, List<AclBindingFilter> filters) {
        List<CompletableFuture<AclDeleteResult>> out = new ArrayList<>();
        for (AclBindingFilter ignored : filters) {
            out.add(CompletableFuture.completedFuture(new AclDeleteResult(new InvalidRequestException(
                    "the local MSK IAM authorizer has no ACLs: policies are set in iam-keys.properties"))));
        }
        return out;
    }

    @Override
    public Iterable<AclBinding> acls(AclBindingFilter filter) {
        return Collections.emptyList();
    }

    @Override
    public void close() {}
}
