# Object storage and least-privilege IAM for unusual:
#
#   s3://<bucket>/data/     input Parquet shards                      jobs: read
#   s3://<bucket>/models/   checkpoint bundles (+ <bundle>.checkpoints) jobs: read/write   serving: read
#   s3://<bucket>/scores/   batch-scoring output, evaluation reports  jobs: read/write
#
#   terraform init && terraform apply -var bucket_name=my-unusual-bucket
#
# The job policy is also written out as plain JSON in infra/iam-policy.json (for a bucket named
# "unusual"); keep the two in step (tests/test_deploy_manifests.py checks that they grant the same
# actions).

terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0"
    }
  }
}

provider "aws" {
  region = var.region
  default_tags {
    tags = var.tags
  }
}

locals {
  kms        = var.kms_key_arn != ""
  bucket_arn = aws_s3_bucket.this.arn

  # s3:ListBucket is limited by s3:prefix to these areas: "data/*" also matches "data/" itself, and the
  # form without the slash lets s3fs / pyarrow ask whether "s3://bucket/data" is a directory.
  job_list_prefixes = distinct(flatten([
    for p in [var.data_prefix, var.models_prefix, var.scores_prefix] : ["${p}*", trimsuffix(p, "/")]
  ]))
  serving_list_prefixes = ["${var.models_prefix}*", trimsuffix(var.models_prefix, "/")]

  # Objects the jobs write: bundles, training checkpoints, score parts, _unusual/ job records,
  # _quarantine/, _evaluation/. Delete: re-running a scoring job deletes half-done parts, and
  # --overwrite replaces an output. Multipart: large parts upload in pieces.
  job_write_actions = [
    "s3:GetObject",
    "s3:PutObject",
    "s3:DeleteObject",
    "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts",
  ]
}

# --------------------------------------------------------------------------- the bucket

resource "aws_s3_bucket" "this" {
  bucket        = var.bucket_name
  force_destroy = var.force_destroy
}

resource "aws_s3_bucket_ownership_controls" "this" {
  bucket = aws_s3_bucket.this.id
  rule {
    object_ownership = "BucketOwnerEnforced" # no ACLs: access is decided by IAM policies alone
  }
}

resource "aws_s3_bucket_public_access_block" "this" {
  bucket                  = aws_s3_bucket.this.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "this" {
  bucket = aws_s3_bucket.this.id
  versioning_configuration {
    status = "Enabled" # an overwritten bundle or deleted score part can be restored
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "this" {
  bucket = aws_s3_bucket.this.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = local.kms ? "aws:kms" : "AES256"
      kms_master_key_id = local.kms ? var.kms_key_arn : null
    }
    bucket_key_enabled = local.kms
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "this" {
  bucket = aws_s3_bucket.this.id
  rule {
    id     = "expire-noncurrent-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_expiration_days
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }
  depends_on = [aws_s3_bucket_versioning.this]
}

data "aws_iam_policy_document" "bucket" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [local.bucket_arn, "${local.bucket_arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "this" {
  bucket     = aws_s3_bucket.this.id
  policy     = data.aws_iam_policy_document.bucket.json
  depends_on = [aws_s3_bucket_public_access_block.this]
}

# --------------------------------------------------------------------------- the jobs' policy

data "aws_iam_policy_document" "jobs" {
  statement {
    sid       = "ListOwnPrefixes"
    actions   = ["s3:ListBucket"]
    resources = [local.bucket_arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = local.job_list_prefixes
    }
  }

  # s3fs checks that the bucket exists (HeadBucket, then GetBucketLocation) before it "creates a
  # directory"; HeadBucket is denied by the prefix condition above, this one answers instead.
  statement {
    sid       = "BucketLocation"
    actions   = ["s3:GetBucketLocation"]
    resources = [local.bucket_arn]
  }

  statement {
    sid       = "ReadData"
    actions   = ["s3:GetObject"]
    resources = ["${local.bucket_arn}/${var.data_prefix}*"]
  }

  statement {
    sid     = "ReadWriteModelsAndScores"
    actions = local.job_write_actions
    resources = [
      "${local.bucket_arn}/${var.models_prefix}*",
      "${local.bucket_arn}/${var.scores_prefix}*",
    ]
  }

  dynamic "statement" {
    for_each = local.kms ? [1] : []
    content {
      sid       = "UseBucketKmsKey"
      actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
      resources = [var.kms_key_arn]
    }
  }
}

resource "aws_iam_policy" "jobs" {
  name        = "${var.name_prefix}-jobs"
  description = "unusual train / score / evaluate: read ${var.data_prefix}, read/write ${var.models_prefix} and ${var.scores_prefix} of ${var.bucket_name}"
  policy      = data.aws_iam_policy_document.jobs.json
}

# --------------------------------------------------------------------------- the serving policy

data "aws_iam_policy_document" "serving" {
  statement {
    sid       = "ListModels"
    actions   = ["s3:ListBucket"]
    resources = [local.bucket_arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = local.serving_list_prefixes
    }
  }

  statement {
    sid       = "BucketLocation"
    actions   = ["s3:GetBucketLocation"]
    resources = [local.bucket_arn]
  }

  statement {
    sid       = "ReadModels"
    actions   = ["s3:GetObject"]
    resources = ["${local.bucket_arn}/${var.models_prefix}*"]
  }

  dynamic "statement" {
    for_each = local.kms ? [1] : []
    content {
      sid       = "DecryptWithBucketKmsKey"
      actions   = ["kms:Decrypt"]
      resources = [var.kms_key_arn]
    }
  }
}

resource "aws_iam_policy" "serving" {
  name        = "${var.name_prefix}-serving"
  description = "unusual Ray Serve: read the bundles under ${var.models_prefix} of ${var.bucket_name}"
  policy      = data.aws_iam_policy_document.serving.json
}

# --------------------------------------------------------------------------- EC2 instance profiles (cluster/aws.yaml)
# Workers: the job policy. Head: the job policy plus what the Ray autoscaler needs to launch and
# terminate workers with the worker profile. For EKS, attach jobs_policy_arn / serving_policy_arn to
# IRSA or Pod Identity roles of the service accounts unusual-jobs / unusual-serving instead.

data "aws_iam_policy_document" "ec2_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "worker" {
  count              = var.create_instance_profiles ? 1 : 0
  name               = "${var.name_prefix}-ray-worker"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_role_policy_attachment" "worker_jobs" {
  count      = var.create_instance_profiles ? 1 : 0
  role       = aws_iam_role.worker[0].name
  policy_arn = aws_iam_policy.jobs.arn
}

resource "aws_iam_instance_profile" "worker" {
  count = var.create_instance_profiles ? 1 : 0
  name  = "${var.name_prefix}-ray-worker"
  role  = aws_iam_role.worker[0].name
}

resource "aws_iam_role" "head" {
  count              = var.create_instance_profiles ? 1 : 0
  name               = "${var.name_prefix}-ray-head"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_role_policy_attachment" "head_jobs" {
  count      = var.create_instance_profiles ? 1 : 0
  role       = aws_iam_role.head[0].name
  policy_arn = aws_iam_policy.jobs.arn
}

data "aws_iam_policy_document" "autoscaler" {
  count = var.create_instance_profiles ? 1 : 0

  statement {
    sid = "LaunchAndStopWorkers"
    actions = [
      "ec2:RunInstances",
      "ec2:TerminateInstances",
      "ec2:StartInstances",
      "ec2:StopInstances",
      "ec2:CreateTags",
      "ec2:DescribeInstances",
      "ec2:DescribeInstanceTypes",
      "ec2:DescribeImages",
      "ec2:DescribeSubnets",
      "ec2:DescribeSecurityGroups",
      "ec2:DescribeKeyPairs",
      "ec2:DescribeAvailabilityZones",
    ]
    resources = ["*"] # RunInstances needs the instance, volume, ENI, subnet, image and group ARNs
  }

  statement {
    sid       = "PassWorkerRole"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.worker[0].arn]
  }

  statement {
    sid       = "ReadWorkerProfile"
    actions   = ["iam:GetInstanceProfile"]
    resources = [aws_iam_instance_profile.worker[0].arn]
  }
}

resource "aws_iam_role_policy" "head_autoscaler" {
  count  = var.create_instance_profiles ? 1 : 0
  name   = "ray-autoscaler"
  role   = aws_iam_role.head[0].id
  policy = data.aws_iam_policy_document.autoscaler[0].json
}

resource "aws_iam_instance_profile" "head" {
  count = var.create_instance_profiles ? 1 : 0
  name  = "${var.name_prefix}-ray-head"
  role  = aws_iam_role.head[0].name
}
