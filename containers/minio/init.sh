#!/bin/sh
# One-shot MinIO setup for docker-compose.yaml (service minio-init, image minio/mc): the bucket,
# the "platemask-airflow" policy, and the user Airflow logs in with. Idempotent: runs on every `up`.
# POSIX sh and mc only (the mc image has no sed/grep/jq).
#
# The policy follows README "IAM for the workers": list the bucket; read raw/ audit/ runs/ masked/
# qa/ sagemaker/; write masked/ audit/ runs/ qa/ sagemaker/models/ sagemaker/output/ (the local
# transform runner); no delete anywhere, nothing outside the bucket, no admin rights.
set -eu
: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}" "${PLATEMASK_S3_ACCESS_KEY:?}" "${PLATEMASK_S3_SECRET_KEY:?}" "${PLATEMASK_BUCKET:?}"

refuse() { echo "minio-init: refusing to start: $*" >&2; exit 1; }
[ "$PLATEMASK_S3_ACCESS_KEY" != "$MINIO_ROOT_USER" ] || refuse "PLATEMASK_S3_ACCESS_KEY must not be the MinIO root user"
[ "${#MINIO_ROOT_PASSWORD}" -ge 20 ] || refuse "MINIO_ROOT_PASSWORD is shorter than 20 characters; run make env"
[ "${#PLATEMASK_S3_SECRET_KEY}" -ge 20 ] || refuse "PLATEMASK_S3_SECRET_KEY is shorter than 20 characters; run make env"
case "$MINIO_ROOT_USER:$MINIO_ROOT_PASSWORD" in
  minioadmin:*|*:minioadmin|*:platemask-secret) refuse "MinIO root credentials are a well-known default; run make env" ;;
esac

mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing "local/$PLATEMASK_BUCKET"
mc anonymous set none "local/$PLATEMASK_BUCKET"

B="arn:aws:s3:::$PLATEMASK_BUCKET"
cat > /tmp/platemask-airflow.json <<POLICY
{
  "Version": "2012-10-17",
  "Statement": [
    {"Sid": "ListTheBucket", "Effect": "Allow",
     "Action": ["s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads"],
     "Resource": ["$B"]},
    {"Sid": "Read", "Effect": "Allow",
     "Action": ["s3:GetObject"],
     "Resource": ["$B/raw/*", "$B/audit/*", "$B/runs/*", "$B/masked/*", "$B/qa/*", "$B/sagemaker/*"]},
    {"Sid": "Write", "Effect": "Allow",
     "Action": ["s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
     "Resource": ["$B/masked/*", "$B/audit/*", "$B/runs/*", "$B/qa/*", "$B/sagemaker/models/*", "$B/sagemaker/output/*"]},
    {"Sid": "RemoveStaleMaskedCopies", "Effect": "Allow",
     "Action": ["s3:DeleteObject"],
     "Resource": ["$B/masked/*"]}
  ]
}
POLICY
mc admin policy create local platemask-airflow /tmp/platemask-airflow.json
mc admin user add local "$PLATEMASK_S3_ACCESS_KEY" "$PLATEMASK_S3_SECRET_KEY"
if ! out=$(mc admin policy attach local platemask-airflow --user "$PLATEMASK_S3_ACCESS_KEY" 2>&1); then
  case "$out" in
    *"already"*) ;;  # attached on an earlier `up`
    *) echo "$out" >&2; exit 1 ;;
  esac
fi
echo "minio-init: bucket $PLATEMASK_BUCKET, policy platemask-airflow, user $PLATEMASK_S3_ACCESS_KEY ready"
